//! `inspector synth`: procedural factory scenes with hazards, in the annotation format.

use std::{path::PathBuf, process::ExitCode};

use anyhow::bail;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use inspector_synth::{Hazard, SynthConfig, write_dataset};

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// How many scenes.
    #[arg(long, value_name = "N")]
    pub n: u64,
    /// The seed; the same seed gives the same scenes on every machine.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder: `images/*.png` and `annotations.jsonl` go in it.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Image width in pixels (the height is three quarters of it).
    #[arg(long, value_name = "PX", default_value_t = 448)]
    pub size: u32,
    /// Leave a hazard out (repeatable): no-helmet, no-vest, bad-lift, walkway-debris,
    /// cabinet-no-lockout, blocked-exit, stack-too-high.
    #[arg(long, value_name = "HAZARD")]
    pub exclude: Vec<String>,
    /// Show a hazard in at least half of the unsafe scenes (repeatable).
    #[arg(long, value_name = "HAZARD")]
    pub boost: Vec<String>,
    /// Share of scenes with no hazard.
    #[arg(long, value_name = "F", default_value_t = 0.3)]
    pub safe_fraction: f64,
}

fn hazards(keys: &[String], flag: &str) -> anyhow::Result<Vec<Hazard>> {
    keys.iter()
        .map(|k| match Hazard::from_key(k) {
            Some(h) => Ok(h),
            None => {
                let known: Vec<&str> = Hazard::ALL.iter().map(|h| h.key()).collect();
                bail!("{flag} {k}: unknown hazard (known: {})", known.join(", "))
            }
        })
        .collect()
}

pub fn run(args: SynthArgs) -> anyhow::Result<ExitCode> {
    if !(64..=4096).contains(&args.size) {
        bail!("--size {}: must be between 64 and 4096 pixels", args.size);
    }
    if !(0.0..=1.0).contains(&args.safe_fraction) {
        bail!(
            "--safe-fraction {}: must be between 0 and 1",
            args.safe_fraction
        );
    }
    let exclude = hazards(&args.exclude, "--exclude")?;
    let config = SynthConfig {
        width: args.size,
        hazards: Hazard::ALL
            .into_iter()
            .filter(|h| !exclude.contains(h))
            .collect(),
        safe_fraction: args.safe_fraction,
        boost: hazards(&args.boost, "--boost")?,
    };
    let bar = ProgressBar::new(args.n).with_style(
        ProgressStyle::with_template("synth {bar:30} {pos}/{len} scenes  ETA {eta}")
            .expect("valid template"),
    );
    let file = write_dataset(&args.out, &config, args.seed, args.n, || bar.inc(1))?;
    bar.finish_and_clear();
    println!("wrote {} scenes: {}", args.n, file.display());
    Ok(ExitCode::SUCCESS)
}
