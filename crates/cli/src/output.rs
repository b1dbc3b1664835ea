//! Writing files atomically: a temporary file in the target's folder, renamed over the target,
//! so a reader never sees half a file and a failure leaves the old file as it was.

use std::path::Path;

pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    Ok(inspector_dataset::write_atomic(path, bytes)?)
}

/// The folder `file` goes into (`.` for a bare name), created if missing: paths written into
/// the file are made relative to it.
pub fn folder_of(file: &Path) -> anyhow::Result<&Path> {
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", dir.display()))?;
    Ok(dir)
}
