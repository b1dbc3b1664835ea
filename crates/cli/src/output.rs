//! Writing files atomically: a temporary file in the target's folder, renamed over the target,
//! so a reader never sees half a file and a failure leaves the old file as it was.

use std::path::Path;

pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    Ok(inspector_dataset::write_atomic(path, bytes)?)
}
