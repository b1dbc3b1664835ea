//! Generation: greedy decoding and sampling (temperature, top-k, top-p, repetition penalty, as
//! transformers defines them), stopping on eos per row, streaming through a callback.

use std::path::Path;

use candle_core::Tensor;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::Value;

use crate::{Batch, Error, Logits, Qwen2Vl};

/// Decoding settings. `temperature == 0` (or `do_sample == false`) means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub do_sample: bool,
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: u64,
    pub eos: Vec<u32>,
    /// Fed to rows that have finished while others go on.
    pub pad: u32,
}

impl GenerationConfig {
    /// Greedy decoding of up to `max_new_tokens`, stopping at `eos`.
    pub fn greedy(max_new_tokens: usize, eos: Vec<u32>, pad: u32) -> Self {
        GenerationConfig {
            max_new_tokens,
            do_sample: false,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            repetition_penalty: None,
            seed: 0,
            eos,
            pad,
        }
    }

    /// The defaults of `generation_config.json` (transformers' defaults where it is silent),
    /// with the model's eos and pad ids.
    pub fn from_model_dir(dir: &Path, model: &Qwen2Vl) -> Result<Self, Error> {
        let tokens = &model.config.tokens;
        let pad = tokens.pad.or(tokens.eos.first().copied()).unwrap_or(0);
        let mut c = GenerationConfig::greedy(512, tokens.eos.clone(), pad);
        c.top_k = Some(50); // transformers' default when sampling
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(c);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path: path.clone(),
            message: format!("not valid JSON: {e}"),
        })?;
        let f = |k: &str| v.get(k).and_then(Value::as_f64);
        c.do_sample = v.get("do_sample").and_then(Value::as_bool).unwrap_or(false);
        if let Some(t) = f("temperature") {
            c.temperature = t;
        }
        c.top_k = v
            .get("top_k")
            .and_then(Value::as_u64)
            .map(|k| k as usize)
            .or(c.top_k);
        c.top_p = f("top_p").or(c.top_p);
        c.repetition_penalty = f("repetition_penalty");
        if let Some(n) = v.get("max_new_tokens").and_then(Value::as_u64) {
            c.max_new_tokens = n as usize;
        }
        let ids = |key: &str| -> Vec<u32> {
            match v.get(key) {
                Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_u64().map(|x| x as u32))
                    .collect(),
                _ => vec![],
            }
        };
        let eos = ids("eos_token_id");
        if !eos.is_empty() {
            c.eos = eos;
        }
        if let Some(p) = ids("pad_token_id").first() {
            c.pad = *p;
        }
        Ok(c)
    }

    fn is_greedy(&self) -> bool {
        !self.do_sample || self.temperature <= 0.0
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: each token already in the sequence has
/// its logit divided by the penalty when positive, multiplied when negative.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f64) {
    let mut done = std::collections::HashSet::new();
    for &t in seen {
        if !done.insert(t) {
            continue;
        }
        if let Some(l) = logits.get_mut(t as usize) {
            *l = if *l < 0.0 {
                *l * penalty as f32
            } else {
                *l / penalty as f32
            };
        }
    }
}

/// transformers' `TopKLogitsWarper`: logits below the k-th largest become −∞ (ties kept).
pub fn apply_top_k(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let mut sorted: Vec<f32> = logits.to_vec();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    for l in logits.iter_mut() {
        if *l < kth {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// transformers' `TopPLogitsWarper`: sorted ascending, tokens whose cumulative probability is
/// ≤ 1 − top_p are removed; the most likely token always stays.
pub fn apply_top_p(logits: &mut [f32], top_p: f64) {
    if top_p >= 1.0 {
        return;
    }
    let probs = softmax(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
    let mut cumulative = 0.0f64;
    for (rank, &i) in order.iter().enumerate() {
        cumulative += probs[i] as f64;
        if cumulative <= 1.0 - top_p && rank + 1 < order.len() {
            logits[i] = f32::NEG_INFINITY;
        }
    }
}

pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Picks the next token for one row from its logits.
pub struct Sampler {
    config: GenerationConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(config: GenerationConfig) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Sampler { config, rng }
    }

    /// `seen` is the row's prompt and generated tokens so far (for the repetition penalty).
    pub fn next(&mut self, logits: &mut [f32], seen: &[u32]) -> u32 {
        if let Some(p) = self.config.repetition_penalty.filter(|p| *p != 1.0) {
            apply_repetition_penalty(logits, seen, p);
        }
        if self.config.is_greedy() {
            return argmax(logits);
        }
        let t = self.config.temperature as f32;
        logits.iter_mut().for_each(|l| *l /= t);
        if let Some(k) = self.config.top_k {
            apply_top_k(logits, k);
        }
        if let Some(p) = self.config.top_p {
            apply_top_p(logits, p);
        }
        let probs = softmax(logits);
        let x: f32 = self.rng.random();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if x < acc {
                return i as u32;
            }
        }
        argmax(&probs)
    }
}

/// How sure the model was of one generated token, from its raw next-token distribution
/// (before repetition penalty, temperature and truncation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenStat {
    /// Probability of the token chosen.
    pub prob: f32,
    /// Entropy of the distribution, in nats.
    pub entropy: f32,
    /// Top-1 minus top-2 probability.
    pub margin: f32,
}

impl TokenStat {
    /// From a row of raw logits and the token chosen.
    pub fn of(logits: &[f32], chosen: u32) -> TokenStat {
        let probs = softmax(logits);
        let (mut p1, mut p2) = (0f32, 0f32);
        let mut entropy = 0f32;
        for &p in &probs {
            if p > 0.0 {
                entropy -= p * p.ln();
            }
            if p > p1 {
                p2 = p1;
                p1 = p;
            } else if p > p2 {
                p2 = p;
            }
        }
        TokenStat {
            prob: probs.get(chosen as usize).copied().unwrap_or(0.0),
            entropy,
            margin: p1 - p2,
        }
    }
}

/// What generation produced for each row.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// New tokens per row, eos excluded.
    pub tokens: Vec<Vec<u32>>,
    /// One per generated token of each row, eos included (so one more than `tokens` when the
    /// row stopped at an eos).
    pub stats: Vec<Vec<TokenStat>>,
    /// Whether each row stopped at an eos (else at `max_new_tokens`).
    pub stopped_at_eos: Vec<bool>,
}

/// Restricts which tokens generation may choose (constrained decoding).
pub trait Constraint {
    /// Whether `row` may emit `token` next.
    fn allows(&mut self, row: usize, token: u32) -> bool;
    /// Records that `row` emitted `token`.
    fn push(&mut self, row: usize, token: u32);
}

/// Generates for a (left-padded) batch. `on_token(row, token)` is called for every new token
/// (eos included) as soon as it is chosen.
pub fn generate(
    model: &Qwen2Vl,
    batch: &Batch,
    config: &GenerationConfig,
    on_token: impl FnMut(usize, u32),
) -> Result<Generated, Error> {
    generate_constrained(model, batch, config, None, on_token)
}

/// The sampler's choice among the tokens `constraint` allows: the sampler's pick is taken when
/// allowed, else it is masked out and the sampler asked again; after 32 refusals every token is
/// checked once. Greedy decoding thus picks the most likely allowed token.
fn choose(
    sampler: &mut Sampler,
    row: &mut [f32],
    seen: &[u32],
    constraint: &mut dyn Constraint,
    i: usize,
    fallback: u32,
) -> u32 {
    for _ in 0..32 {
        let mut candidate = row.to_vec();
        let t = sampler.next(&mut candidate, seen);
        if constraint.allows(i, t) {
            return t;
        }
        row[t as usize] = f32::NEG_INFINITY;
    }
    let mut any = false;
    for (t, v) in row.iter_mut().enumerate() {
        if v.is_finite() {
            if constraint.allows(i, t as u32) {
                any = true;
            } else {
                *v = f32::NEG_INFINITY;
            }
        }
    }
    if !any {
        return fallback;
    }
    sampler.next(row, seen)
}

/// [`generate`] with every token checked by `constraint` (when given): each row only ever emits
/// tokens the constraint allows. Token statistics are those of the unconstrained distribution.
pub fn generate_constrained(
    model: &Qwen2Vl,
    batch: &Batch,
    config: &GenerationConfig,
    mut constraint: Option<&mut dyn Constraint>,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Generated, Error> {
    let b = batch.input_ids.len();
    let max = model.config.text.max_position_embeddings;
    let prompt_len = batch.input_ids.first().map_or(0, Vec::len);
    if prompt_len + 1 > max {
        return Err(Error::TooLong {
            tokens: prompt_len,
            max,
        });
    }
    let mut sampler = Sampler::new(config.clone());
    let mut seen: Vec<Vec<u32>> = batch
        .input_ids
        .iter()
        .enumerate()
        .map(|(i, row)| match &batch.attention_mask {
            Some(m) => row
                .iter()
                .zip(&m[i])
                .filter(|(_, k)| **k)
                .map(|(t, _)| *t)
                .collect(),
            None => row.clone(),
        })
        .collect();
    let mut out = Generated {
        tokens: vec![Vec::new(); b],
        stats: vec![Vec::new(); b],
        stopped_at_eos: vec![false; b],
    };
    if config.max_new_tokens == 0 {
        return Ok(out);
    }
    let prefill = model.forward(batch, Logits::Last)?;
    let mut state = prefill.state;
    let mut logits = prefill.logits;
    let mut done = vec![false; b];
    // Greedy decoding without a repetition penalty needs no row on the host: on a GPU the
    // argmax and the token statistics are reduced on the device and four numbers a row come
    // back per step. A row's logits are copied only when the constraint refuses its argmax.
    let on_device = config.is_greedy()
        && config.repetition_penalty.is_none_or(|p| p == 1.0)
        && (!logits.device().is_cpu() || crate::ops::forced() == Some(crate::ops::Kernel::Candle));
    let fallback = config.eos.first().copied().unwrap_or(config.pad);
    for step in 0..config.max_new_tokens {
        let reduced = if on_device {
            Some(reduce_rows(&logits)?)
        } else {
            None
        };
        let rows = match reduced {
            Some(_) => vec![Vec::new(); b],
            None => rows_of(&logits)?,
        };
        let mut next = vec![config.pad; b];
        for (i, mut row) in rows.into_iter().enumerate() {
            if done[i] {
                continue;
            }
            // The device's greedy choice, when there is one and the constraint takes it.
            let taken = match (&reduced, constraint.as_deref_mut()) {
                (Some(r), Some(c)) => c.allows(i, r[i].argmax).then_some(r[i]),
                (Some(r), None) => Some(r[i]),
                (None, _) => None,
            };
            let (t, stat) = match taken {
                Some(r) => {
                    if let Some(c) = constraint.as_deref_mut() {
                        c.push(i, r.argmax);
                    }
                    (r.argmax, r.stat)
                }
                None => {
                    if reduced.is_some() {
                        // The argmax was refused: this row comes to the host after all.
                        row = logits
                            .get(i)?
                            .to_dtype(candle_core::DType::F32)?
                            .to_vec1()?;
                    }
                    let raw = row.clone();
                    let t = match constraint.as_deref_mut() {
                        Some(c) => {
                            let t = choose(&mut sampler, &mut row, &seen[i], c, i, fallback);
                            c.push(i, t);
                            t
                        }
                        None => sampler.next(&mut row, &seen[i]),
                    };
                    (t, TokenStat::of(&raw, t))
                }
            };
            out.stats[i].push(stat);
            next[i] = t;
            seen[i].push(t);
            on_token(i, t);
            if config.eos.contains(&t) {
                done[i] = true;
                out.stopped_at_eos[i] = true;
            } else {
                out.tokens[i].push(t);
            }
        }
        if done.iter().all(|d| *d) || step + 1 == config.max_new_tokens {
            break;
        }
        if state.cache.len() + 1 > max {
            break;
        }
        logits = model.step(&next, &mut state)?;
    }
    Ok(out)
}

/// A row's greedy choice and its statistics, reduced where its logits are.
#[derive(Clone, Copy)]
struct Reduced {
    argmax: u32,
    stat: TokenStat,
}

/// For each row of `[B, V]` logits: the argmax (the first of equal maxima, as [`argmax`]), and
/// the probability, top-2 margin and entropy that [`TokenStat::of`] computes on the host. One
/// `[B, 4]` copy leaves the device.
fn reduce_rows(logits: &Tensor) -> Result<Vec<Reduced>, Error> {
    use candle_core::{D, DType};
    let logits = logits.to_dtype(DType::F32)?;
    let (_, v) = logits.dims2()?;
    let argmax = logits.argmax_keepdim(D::Minus1)?; // [B, 1]
    let probs = candle_nn::ops::softmax_last_dim(&logits.contiguous()?)?;
    let p1 = probs.max_keepdim(D::Minus1)?;
    let ids = Tensor::arange(0u32, v as u32, logits.device())?.unsqueeze(0)?;
    let zeros = probs.zeros_like()?;
    let others = ids.broadcast_eq(&argmax)?.where_cond(&zeros, &probs)?;
    let p2 = others.max_keepdim(D::Minus1)?;
    let plogp = probs
        .gt(0f32)?
        .where_cond(&(&probs * probs.log()?)?, &zeros)?;
    let entropy = plogp.sum_keepdim(D::Minus1)?.neg()?;
    let summary = Tensor::cat(&[&argmax.to_dtype(DType::F32)?, &p1, &p2, &entropy], 1)?;
    Ok(summary
        .to_vec2::<f32>()?
        .into_iter()
        .map(|r| Reduced {
            argmax: r[0] as u32,
            stat: TokenStat {
                prob: r[1],
                entropy: r[3],
                margin: r[1] - r[2],
            },
        })
        .collect())
}

fn rows_of(logits: &Tensor) -> Result<Vec<Vec<f32>>, Error> {
    Ok(logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?)
}

/// Turns a growing token list into text pieces that never split a character: the text is
/// re-decoded as tokens arrive and only the part that is complete (not ending in an
/// unfinished UTF-8 sequence, shown as U+FFFD) is released. The pieces concatenate to exactly
/// the final decoded text.
/// A function from token ids to text.
type Decode<'a> = Box<dyn Fn(&[u32]) -> Result<String, Error> + 'a>;

pub struct TextStream<'a> {
    decode: Decode<'a>,
    tokens: Vec<u32>,
    emitted: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(decode: impl Fn(&[u32]) -> Result<String, Error> + 'a) -> Self {
        TextStream {
            decode: Box::new(decode),
            tokens: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds a token; returns the newly completed text, if any.
    pub fn push(&mut self, token: u32) -> Result<Option<String>, Error> {
        self.tokens.push(token);
        let text = (self.decode)(&self.tokens)?;
        if text.ends_with('\u{FFFD}')
            || text.len() <= self.emitted
            || !text.is_char_boundary(self.emitted)
        {
            return Ok(None);
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(Some(piece))
    }

    /// Whatever remains (an unfinished sequence at the very end included).
    pub fn finish(self) -> Result<Option<String>, Error> {
        let text = (self.decode)(&self.tokens)?;
        Ok((text.len() > self.emitted).then(|| text[self.emitted..].to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(
        temperature: f64,
        top_k: Option<usize>,
        top_p: Option<f64>,
        seed: u64,
    ) -> GenerationConfig {
        GenerationConfig {
            do_sample: true,
            temperature,
            top_k,
            top_p,
            seed,
            ..GenerationConfig::greedy(8, vec![], 0)
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut l = vec![2.0, -1.0, 0.5];
        apply_repetition_penalty(&mut l, &[0, 1, 0], 2.0);
        assert_eq!(l, vec![1.0, -2.0, 0.5]);
    }

    #[test]
    fn top_k_keeps_ties() {
        let mut l = vec![1.0, 3.0, 2.0, 3.0];
        apply_top_k(&mut l, 2);
        assert_eq!(l, vec![f32::NEG_INFINITY, 3.0, f32::NEG_INFINITY, 3.0]);
        let mut l = vec![1.0, 3.0, 2.0];
        apply_top_k(&mut l, 2);
        assert_eq!(l, vec![f32::NEG_INFINITY, 3.0, 2.0]);
    }

    #[test]
    fn top_p_hand_computed() {
        let probs = [0.5f32, 0.3, 0.15, 0.05];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        // Ascending cumulative: 0.05, 0.20, 0.50, 1.0. top_p 0.75 removes cumulative ≤ 0.25.
        let mut l = logits.clone();
        apply_top_p(&mut l, 0.75);
        assert!(l[2].is_infinite() && l[3].is_infinite() && l[0].is_finite() && l[1].is_finite());
        let mut l = logits.clone();
        apply_top_p(&mut l, 0.9); // removes cumulative ≤ 0.1: only 0.05
        assert!(l[3].is_infinite() && l[2].is_finite());
        // The most likely token always survives.
        let mut l = logits;
        apply_top_p(&mut l, 0.01);
        assert!(l[0].is_finite() && l[1..].iter().all(|x| x.is_infinite()));
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let draw = |seed: u64, n: usize| -> Vec<u32> {
            let mut s = Sampler::new(sampling(1.0, None, None, seed));
            (0..n).map(|_| s.next(&mut logits.clone(), &[])).collect()
        };
        assert_eq!(draw(7, 200), draw(7, 200), "same seed, same tokens");
        assert_ne!(draw(7, 200), draw(8, 200));
        let n = 40_000;
        let tokens = draw(1, n);
        for (i, p) in [0.5, 0.3, 0.15, 0.05].iter().enumerate() {
            let freq = tokens.iter().filter(|&&t| t == i as u32).count() as f64 / n as f64;
            assert!((freq - p).abs() < 0.01, "token {i}: {freq} vs {p}");
        }
        // Temperature 0.5 squares the odds: p ∝ p², i.e. 0.25/0.09/0.0225/0.0025 normalised.
        let mut s = Sampler::new(sampling(0.5, None, None, 3));
        let tokens: Vec<u32> = (0..n).map(|_| s.next(&mut logits.clone(), &[])).collect();
        let z = 0.25 + 0.09 + 0.0225 + 0.0025;
        let freq0 = tokens.iter().filter(|&&t| t == 0).count() as f64 / n as f64;
        assert!((freq0 - 0.25 / z).abs() < 0.01, "{freq0}");
    }

    #[test]
    fn temperature_zero_is_greedy() {
        let logits = vec![0.1f32, 2.0, 1.9, -3.0];
        let mut greedy = Sampler::new(GenerationConfig::greedy(8, vec![], 0));
        let mut zero = Sampler::new(sampling(0.0, Some(50), Some(0.9), 5));
        let mut tiny = Sampler::new(sampling(1e-3, None, None, 5));
        for _ in 0..50 {
            assert_eq!(greedy.next(&mut logits.clone(), &[]), 1);
            assert_eq!(zero.next(&mut logits.clone(), &[]), 1);
            assert_eq!(tiny.next(&mut logits.clone(), &[]), 1);
        }
    }
}
