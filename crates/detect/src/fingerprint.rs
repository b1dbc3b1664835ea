//! Fingerprints of models and adapters, for cache keys and provenance.
//!
//! A model's fingerprint hashes its `config.json` and, for every safetensors file, its name,
//! length, the tensor listing of its header (names, dtypes, shapes) and three 1 MiB samples of
//! its data (start, middle, end): reading a 15 GB checkpoint whole at every start would take
//! longer than loading it, and a retrained model with the same shapes still changes. An
//! adapter is small, so its fingerprint hashes its config and weight bytes entirely.

use std::{
    io::{Read, Seek, SeekFrom},
    path::Path,
};

use sha2::{Digest, Sha256};

use crate::Error;

const SAMPLE: u64 = 1 << 20;

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

fn hex(digest: &[u8]) -> String {
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The header's tensors as sorted `name dtype shape` lines.
fn header_listing(path: &Path, file: &mut std::fs::File) -> Result<(String, u64), Error> {
    let mut n = [0u8; 8];
    file.read_exact(&mut n).map_err(|e| io(path, e))?;
    let len = u64::from_le_bytes(n);
    let total = file.metadata().map_err(|e| io(path, e))?.len();
    if len == 0 || len > 100 << 20 || 8 + len > total {
        return Err(Error::Model {
            path: path.to_path_buf(),
            message: "not a safetensors file (bad header length)".into(),
        });
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(|e| io(path, e))?;
    let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| Error::Model {
            path: path.to_path_buf(),
            message: format!("invalid safetensors header: {e}"),
        })?;
    let mut lines: Vec<String> = json
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| format!("{k} {} {}", v["dtype"], v["shape"]))
        .collect();
    lines.sort();
    Ok((lines.join("\n"), 8 + len))
}

/// The fingerprint of a Hugging Face model directory.
pub fn model_fingerprint(dir: &Path) -> Result<String, Error> {
    let mut h = Sha256::new();
    let config = dir.join("config.json");
    h.update(std::fs::read(&config).map_err(|e| io(&config, e))?);
    let gguf = dir.join(inspector_qwen2vl::quant::GGUF_FILE);
    if inspector_qwen2vl::quant::QuantRecord::read(dir)?.is_some() {
        // A quantized directory: its record, and the GGUF file's length and samples (its
        // header, which lists every tensor, is in the first one).
        let record = dir.join(inspector_qwen2vl::quant::RECORD_FILE);
        h.update(std::fs::read(&record).map_err(|e| io(&record, e))?);
        let mut file = std::fs::File::open(&gguf).map_err(|e| io(&gguf, e))?;
        let total = file.metadata().map_err(|e| io(&gguf, e))?.len();
        h.update(total.to_le_bytes());
        sample(&gguf, &mut file, 0, total, &mut h)?;
        return Ok(hex(&h.finalize()));
    }
    let files = inspector_qwen2vl::weights::safetensors_files(dir).map_err(Error::from)?;
    for path in files {
        let mut file = std::fs::File::open(&path).map_err(|e| io(&path, e))?;
        let total = file.metadata().map_err(|e| io(&path, e))?.len();
        let (listing, data_start) = header_listing(&path, &mut file)?;
        h.update(
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        h.update(total.to_le_bytes());
        h.update(listing.as_bytes());
        sample(&path, &mut file, data_start, total, &mut h)?;
    }
    Ok(hex(&h.finalize()))
}

/// Hashes three 1 MiB samples of `file`'s bytes from `start` to `total`: start, middle, end.
fn sample(
    path: &Path,
    file: &mut std::fs::File,
    start: u64,
    total: u64,
    h: &mut Sha256,
) -> Result<(), Error> {
    let data = total - start;
    for at in [start, start + data / 2, total.saturating_sub(SAMPLE)] {
        let at = at.max(start);
        file.seek(SeekFrom::Start(at)).map_err(|e| io(path, e))?;
        let mut buf = Vec::new();
        (&mut *file)
            .take(SAMPLE.min(total - at))
            .read_to_end(&mut buf)
            .map_err(|e| io(path, e))?;
        h.update(&buf);
    }
    Ok(())
}

/// The fingerprint of a PEFT adapter directory (config and weights, whole).
pub fn adapter_fingerprint(dir: &Path) -> Result<String, Error> {
    let mut h = Sha256::new();
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(hex(&h.finalize()))
}
