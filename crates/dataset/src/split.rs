//! `inspector dataset split`: train/eval, deterministic, stratified, grouped by image content.

use std::collections::BTreeMap;

use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::{Error, Record};

/// One stratum's share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stratum {
    pub category: String,
    pub records: usize,
    pub eval: usize,
    /// `round(records × ratio)`.
    pub target: usize,
}

/// The two sides, each in file order, and the per-stratum counts.
#[derive(Debug, Clone)]
pub struct Split {
    pub train: Vec<Record>,
    pub eval: Vec<Record>,
    pub strata: Vec<Stratum>,
}

/// Splits records into train and eval.
///
/// - Records with the same image bytes form a group, and a group goes to one side only, so no
///   photo is ever both trained on and evaluated on.
/// - A group's stratum is the category of its first record (`safe` for safe photos); each
///   stratum gets `round(n × eval_ratio)` eval records (exact when groups are single records,
///   as close as whole groups allow otherwise).
/// - The result depends only on the seed and the records, not on their order in the file:
///   groups are ordered by content hash, then shuffled by a ChaCha8 stream seeded from the seed
///   and the stratum name (ChaCha8 is portable across platforms and `rand` versions).
pub fn split(records: &[Record], eval_ratio: f64, seed: u64) -> Result<Split, Error> {
    if !(eval_ratio > 0.0 && eval_ratio < 1.0) {
        return Err(Error::Refused(format!(
            "--eval-ratio must lie strictly between 0 and 1, not {eval_ratio}"
        )));
    }
    // Content hash → record indices, in file order.
    let mut groups: BTreeMap<[u8; 32], Vec<usize>> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        groups.entry(r.sha256).or_default().push(i);
    }
    let mut strata: BTreeMap<&str, Vec<&Vec<usize>>> = BTreeMap::new();
    for members in groups.values() {
        strata
            .entry(records[members[0]].category.as_str())
            .or_default()
            .push(members);
    }
    let mut to_eval = vec![false; records.len()];
    let mut counts = Vec::new();
    for (category, mut members) in strata {
        let mut seed_bytes: [u8; 32] = Sha256::new()
            .chain_update(seed.to_le_bytes())
            .chain_update(category.as_bytes())
            .finalize()
            .into();
        seed_bytes[31] ^= 0x5a;
        members.shuffle(&mut ChaCha8Rng::from_seed(seed_bytes));
        let n: usize = members.iter().map(|m| m.len()).sum();
        let target = (n as f64 * eval_ratio).round() as usize;
        let mut eval = 0usize;
        for group in members {
            let with = (eval + group.len()).abs_diff(target);
            if eval < target && with < target - eval {
                eval += group.len();
                for &i in group {
                    to_eval[i] = true;
                }
            }
        }
        counts.push(Stratum {
            category: category.to_string(),
            records: n,
            eval,
            target,
        });
    }
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (r, e) in records.iter().zip(to_eval) {
        if e {
            eval.push(r.clone());
        } else {
            train.push(r.clone());
        }
    }
    Ok(Split {
        train,
        eval,
        strata: counts,
    })
}
