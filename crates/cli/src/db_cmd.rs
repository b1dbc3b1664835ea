//! `inspector db`: moving an installation from one database to another.

use std::{io::Write as _, path::Path, process::ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use inspector_photos::PhotoStore;
use inspector_store::{
    Store, migrate,
    migrate::{CopyReport, PhotoRef, Summary},
    redact,
};
use serde_json::json;
use sha2::{Digest, Sha256};

#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Copy an installation into another database, photos included: a single box's SQLite
    /// file into the PostgreSQL server that replicas share (or back).
    ///
    /// Everything is copied with the times it was stored at: documents and their rules,
    /// inspections, camera events and their acknowledgements, API keys (hashes and
    /// revocations) and cached answers. Photos and event frames are copied first and checked
    /// against their hashes, so no copied row points at a missing photo. Rows the target holds
    /// already are compared, never overwritten: a second run changes nothing, and a row that
    /// differs stops the run with its name. Afterwards both sides are counted and checksummed
    /// entity by entity; the command fails when a target that was empty before differs.
    Migrate(MigrateArgs),
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The database to copy from: a SQLite file (`sqlite:PATH` or `PATH`) or a PostgreSQL URL.
    #[arg(long, value_name = "PATH|URL")]
    pub from: String,
    /// The database to copy into (created and migrated if new). PostgreSQL passwords come from
    /// PGPASSWORD or ~/.pgpass, never the command line.
    #[arg(long, value_name = "PATH|URL")]
    pub to: String,
    /// Where the source's photos and event frames are: its data dir (`serve --data-dir`), or
    /// its `--photo-store`.
    #[arg(
        long,
        visible_alias = "from-data-dir",
        default_value = "data",
        value_name = "DIR|URL"
    )]
    pub from_photos: String,
    /// Where the target's replicas keep photos: the folder they share, or
    /// `s3://BUCKET[/PREFIX]` (credentials from AWS_* variables). Default: the source's, whose
    /// photos are then checked, not copied.
    #[arg(long, visible_alias = "to-data-dir", value_name = "DIR|URL")]
    pub to_photos: Option<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: DbCommand) -> Result<ExitCode> {
    match cmd {
        DbCommand::Migrate(args) => migrate_cmd(args),
    }
}

fn open_source(db: &str) -> Result<Box<dyn Store>> {
    if !inspector_store::is_server_url(db) {
        // A source that is not there is a mistake, not a new empty database.
        let path = Path::new(db.strip_prefix("sqlite:").unwrap_or(db));
        if !path.is_file() {
            bail!("--from: no database at {}", path.display());
        }
    }
    inspector_store::open(db).with_context(|| format!("--from {}", redact(db)))
}

fn migrate_cmd(args: MigrateArgs) -> Result<ExitCode> {
    let from_shown = redact(&args.from);
    let to_shown = redact(&args.to);
    let file = |db: &str| {
        (!inspector_store::is_server_url(db))
            .then(|| {
                Path::new(db.strip_prefix("sqlite:").unwrap_or(db))
                    .canonicalize()
                    .ok()
            })
            .flatten()
    };
    if args.from == args.to || file(&args.from).is_some_and(|f| Some(f) == file(&args.to)) {
        bail!("--from and --to are the same database ({from_shown})");
    }
    let source = open_source(&args.from)?;
    let mut target = inspector_store::open(&args.to).with_context(|| format!("--to {to_shown}"))?;
    target.enable_wal()?;
    let from_photos = PhotoStore::open(&args.from_photos)
        .with_context(|| format!("--from-photos {}", args.from_photos))?;
    let to_spec = args.to_photos.as_deref().unwrap_or(&args.from_photos);
    let to_photos = PhotoStore::open(to_spec).with_context(|| format!("--to-photos {to_spec}"))?;

    let spinner = ProgressBar::new_spinner().with_message("reading both databases");
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let before = migrate::summary(source.as_ref()).context("reading the source")?;
    let target_was_empty = migrate::is_empty(target.as_ref()).context("reading the target")?;
    let photos = migrate::photos(source.as_ref()).context("listing the source's photos")?;
    spinner.finish_and_clear();

    // Photos first: a copied row never points at a photo the target lacks.
    let photo_sum = copy_photos(&photos, &from_photos, &to_photos)?;

    let bar = ProgressBar::new(before.total()).with_style(
        ProgressStyle::with_template("{msg:>16} [{bar:30}] {pos}/{len} rows ({eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let report = migrate::copy(source.as_ref(), target.as_mut(), &mut |p| {
        bar.set_message(p.entity);
        bar.inc(p.rows);
    })
    .with_context(|| format!("copying {from_shown} into {to_shown}"))?;
    bar.finish_and_clear();

    let after = migrate::summary(target.as_ref()).context("reading the target")?;
    let target_photos = photo_checksum(&photos, &to_photos)?;
    let equal = after == before && target_photos == photo_sum.checksum;
    print_summary(
        &args,
        (&from_shown, &to_shown),
        (&before, &after),
        &report,
        &photo_sum,
        &target_photos,
    )?;
    if !equal && target_was_empty {
        bail!("the target's counts or checksums differ from the source's (see above)");
    }
    if !equal {
        eprintln!(
            "note: the target held rows before this run, so its totals differ from the source's; \
             every source row was found equal there or added"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What copying the photos did.
struct PhotoSummary {
    copied: u64,
    present: u64,
    /// SHA-256 over `relative  sha256-of-bytes` lines, in order.
    checksum: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A photo's bytes and their SHA-256; a missing photo is an error naming it.
fn read_photo(store: &PhotoStore, name: &str) -> Result<(Vec<u8>, String)> {
    let bytes = store
        .get(name)?
        .with_context(|| format!("{name} is not in {}", store.describe()))?;
    let sha = hex(&Sha256::digest(&bytes));
    Ok((bytes, sha))
}

fn copy_photos(photos: &[PhotoRef], from: &PhotoStore, to: &PhotoStore) -> Result<PhotoSummary> {
    let same_store = match (from.as_folder(), to.as_folder()) {
        (Some(a), Some(b)) => match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        },
        _ => from.describe() == to.describe(),
    };
    let bar = ProgressBar::new(photos.len() as u64).with_style(
        ProgressStyle::with_template("          photos [{bar:30}] {pos}/{len} ({eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let mut all = Sha256::new();
    let (mut copied, mut present) = (0, 0);
    for photo in photos {
        let (bytes, sha) =
            read_photo(from, &photo.relative).context("a photo the source database refers to")?;
        if let Some(expected) = &photo.sha256
            && &sha != expected
        {
            bail!(
                "{} in {}: its bytes hash to {sha}, not to the {expected} the database holds",
                photo.relative,
                from.describe()
            );
        }
        all.update(format!("{}  {sha}\n", photo.relative).as_bytes());
        if same_store {
            present += 1;
        } else if to.exists(&photo.relative)? {
            let (_, theirs) = read_photo(to, &photo.relative)?;
            if theirs != sha {
                bail!(
                    "{} already exists in {} with other contents (sha256 {theirs}); not \
                     overwritten",
                    photo.relative,
                    to.describe()
                );
            }
            present += 1;
        } else {
            to.put(&photo.relative, &bytes)?;
            copied += 1;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(PhotoSummary {
        copied,
        present,
        checksum: hex(&all.finalize()),
    })
}

/// The photo checksum as the target's store has them.
fn photo_checksum(photos: &[PhotoRef], store: &PhotoStore) -> Result<String> {
    let mut all = Sha256::new();
    for photo in photos {
        let (_, sha) = read_photo(store, &photo.relative)?;
        all.update(format!("{}  {sha}\n", photo.relative).as_bytes());
    }
    Ok(hex(&all.finalize()))
}

fn print_summary(
    args: &MigrateArgs,
    (from, to): (&str, &str),
    (before, after): (&Summary, &Summary),
    report: &CopyReport,
    photos: &PhotoSummary,
    target_photos: &str,
) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if args.json {
        let entities: Vec<_> = before
            .entities
            .iter()
            .zip(&after.entities)
            .map(|(s, t)| {
                json!({
                    "entity": s.name,
                    "source": s.count,
                    "target": t.count,
                    "added": report.added(s.name),
                    "present": report.present(s.name),
                    "source_sha256": s.sha256,
                    "target_sha256": t.sha256,
                    "equal": s == t,
                })
            })
            .collect();
        let value = json!({
            "from": from,
            "to": to,
            "entities": entities,
            "photos": {
                "count": photos.copied + photos.present,
                "copied": photos.copied,
                "present": photos.present,
                "source_sha256": photos.checksum,
                "target_sha256": target_photos,
                "equal": photos.checksum == target_photos,
            },
            "added": report.total_added() + photos.copied,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(());
    }
    writeln!(out, "{from} → {to}")?;
    writeln!(
        out,
        "{:<16} {:>8} {:>8} {:>8} {:>8}  checksum",
        "", "source", "target", "added", "present"
    )?;
    for (s, t) in before.entities.iter().zip(&after.entities) {
        writeln!(
            out,
            "{:<16} {:>8} {:>8} {:>8} {:>8}  {} {}",
            s.name,
            s.count,
            t.count,
            report.added(s.name),
            report.present(s.name),
            &s.sha256[..12],
            if s == t { "equal" } else { "DIFFERS" }
        )?;
    }
    writeln!(
        out,
        "{:<16} {:>8} {:>8} {:>8} {:>8}  {} {}",
        "photos",
        photos.copied + photos.present,
        photos.copied + photos.present,
        photos.copied,
        photos.present,
        &photos.checksum[..12],
        if photos.checksum == target_photos {
            "equal"
        } else {
            "DIFFERS"
        }
    )?;
    Ok(())
}
