//! `inspector synth`: procedural factory scenes with hazards, in the annotation format; and
//! `--data synth:…` for the trainers, the same scenes rendered when a batch needs them.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use inspector_dataset::Dataset;
use inspector_synth::{Hazard, SynthConfig, render, scene_index, scene_name, write_dataset};
use inspector_train::data::{PhotoSource, Photos};
use rayon::prelude::*;

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

/// The scenes' settings, checked.
fn config(
    size: u32,
    exclude: &[String],
    boost: &[String],
    safe_fraction: f64,
    flag: &str,
) -> anyhow::Result<SynthConfig> {
    if !(64..=4096).contains(&size) {
        bail!("{flag}size {size}: must be between 64 and 4096 pixels");
    }
    if !(0.0..=1.0).contains(&safe_fraction) {
        bail!("{flag}safe-fraction {safe_fraction}: must be between 0 and 1");
    }
    let exclude = hazards(exclude, &format!("{flag}exclude"))?;
    Ok(SynthConfig {
        width: size,
        hazards: Hazard::ALL
            .into_iter()
            .filter(|h| !exclude.contains(h))
            .collect(),
        safe_fraction,
        boost: hazards(boost, &format!("{flag}boost"))?,
    })
}

pub fn run(args: SynthArgs) -> anyhow::Result<ExitCode> {
    let config = config(
        args.size,
        &args.exclude,
        &args.boost,
        args.safe_fraction,
        "--",
    )?;
    let bar = ProgressBar::new(args.n).with_style(
        ProgressStyle::with_template("synth {bar:30} {pos}/{len} scenes  ETA {eta}")
            .expect("valid template"),
    );
    let file = write_dataset(&args.out, &config, args.seed, args.n, || bar.inc(1))?;
    bar.finish_and_clear();
    println!("wrote {} scenes: {}", args.n, file.display());
    Ok(ExitCode::SUCCESS)
}

/// `--data synth:n=N,seed=S,size=PX[,exclude=H]…[,boost=H]…[,safe-fraction=F]`: the `n`
/// scenes `inspector synth` would write with the same options, rendered once to read their
/// ground truth and again whenever a batch needs their pixels. A long run learns from as many
/// fresh scenes as it has steps for, with nothing on disk. `None` when `arg` is a file.
pub fn data_spec(arg: &Path) -> Option<anyhow::Result<SynthData>> {
    let spec = arg.to_str()?.strip_prefix("synth:")?;
    Some(SynthData::parse(spec).with_context(|| {
        format!(
            "--data {}: expected synth:n=N,seed=S,size=PX[,exclude=HAZARD]...[,boost=HAZARD]...[,safe-fraction=F]",
            arg.display()
        )
    }))
}

/// Scenes for a trainer, made on demand ([`data_spec`]).
#[derive(Debug, Clone)]
pub struct SynthData {
    spec: String,
    n: u64,
    seed: u64,
    config: SynthConfig,
}

impl SynthData {
    fn parse(spec: &str) -> anyhow::Result<SynthData> {
        let (mut n, mut seed, mut size, mut safe) = (None, None, None, 0.3);
        let (mut exclude, mut boost) = (Vec::new(), Vec::new());
        for part in spec.split(',') {
            let (key, value) = part
                .split_once('=')
                .with_context(|| format!("`{part}` is not key=value"))?;
            let number = |what: &str| -> anyhow::Result<u64> {
                value
                    .parse()
                    .with_context(|| format!("{what}={value}: not a whole number"))
            };
            match key {
                "n" => n = Some(number("n")?),
                "seed" => seed = Some(number("seed")?),
                "size" => size = Some(u32::try_from(number("size")?).unwrap_or(u32::MAX)),
                "exclude" => exclude.push(value.to_string()),
                "boost" => boost.push(value.to_string()),
                "safe-fraction" => {
                    safe = value
                        .parse()
                        .with_context(|| format!("safe-fraction={value}: not a number"))?
                }
                other => bail!(
                    "unknown key `{other}` (known: n, seed, size, exclude, boost, safe-fraction)"
                ),
            }
        }
        let n = n.context("n= is missing")?;
        anyhow::ensure!(n > 0, "n=0: no scenes");
        Ok(SynthData {
            spec: format!("synth:{spec}"),
            n,
            seed: seed.context("seed= is missing")?,
            config: config(
                size.context("size= is missing")?,
                &exclude,
                &boost,
                safe,
                "",
            )?,
        })
    }

    /// Renders every scene once for its ground truth (in parallel, with a progress bar) and
    /// checks it as an annotation file is checked.
    pub fn load(&self, rules: &[inspector_core::Rule]) -> anyhow::Result<(Dataset, Photos)> {
        let bar = ProgressBar::new(self.n).with_style(
            ProgressStyle::with_template("rendering {bar:30} {pos}/{len} scenes  ETA {eta}")
                .expect("valid template"),
        );
        let scenes: Vec<(inspector_core::Annotation, (u32, u32))> = (0..self.n)
            .into_par_iter()
            .map(|i| {
                let scene = render(&self.config, self.seed, i);
                bar.inc(1);
                (
                    inspector_core::Annotation {
                        image: scene_name(i),
                        violations: scene.violations,
                    },
                    scene.image.dimensions(),
                )
            })
            .collect();
        bar.finish_and_clear();
        let size = scenes[0].1;
        anyhow::ensure!(
            scenes.iter().all(|s| s.1 == size),
            "{}: scenes of different sizes",
            self.spec
        );
        let text = inspector_dataset::jsonl(scenes.iter().map(|s| &s.0));
        let text = String::from_utf8(text).expect("JSON is UTF-8");
        let name = PathBuf::from(&self.spec);
        let dataset = inspector_dataset::load_generated(&name, &text, size, rules)?;
        let source = SynthPhotos {
            seed: self.seed,
            config: self.config.clone(),
        };
        Ok((dataset, Photos::Generated(Arc::new(source))))
    }
}

/// Renders a scene by its name (`images/00042.png` → scene 42 of the seed).
#[derive(Debug)]
struct SynthPhotos {
    seed: u64,
    config: SynthConfig,
}

impl PhotoSource for SynthPhotos {
    fn photo(&self, name: &str) -> Result<image::RgbImage, inspector_qwen2vl::Error> {
        let index = scene_index(name).ok_or_else(|| {
            inspector_qwen2vl::Error::Input(format!("{name}: not the name of a synthetic scene"))
        })?;
        Ok(render(&self.config, self.seed, index).image)
    }
}
