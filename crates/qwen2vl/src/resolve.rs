//! `--model` resolution: a local Hugging Face model directory, or a repo id (`Qwen/Qwen2-VL-2B-Instruct`)
//! found in the local Hugging Face cache (the `HF_HUB_CACHE` layout:
//! `models--Qwen--Qwen2-VL-2B-Instruct/{refs/main, snapshots/<hash>/…}`).
//!
//! The library takes the cache folder as an argument; reading `HF_HOME` / `HF_HUB_CACHE` is the
//! caller's job.

use std::path::{Path, PathBuf};

use crate::Error;

/// Where the Hugging Face cache is, as the environment says (`HF_HUB_CACHE`, else
/// `HF_HOME/hub`, else `~/.cache/huggingface/hub`).
pub fn default_cache_dir(
    hf_hub_cache: Option<&str>,
    hf_home: Option<&str>,
    home: Option<&str>,
) -> PathBuf {
    if let Some(c) = hf_hub_cache.filter(|s| !s.is_empty()) {
        return PathBuf::from(c);
    }
    if let Some(h) = hf_home.filter(|s| !s.is_empty()) {
        return Path::new(h).join("hub");
    }
    Path::new(home.unwrap_or(".")).join(".cache/huggingface/hub")
}

fn is_repo_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let ok = |s: Option<&str>| {
        s.is_some_and(|s| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// How to reach a Hugging Face hub when a repo id is not cached.
#[derive(Debug, Clone)]
pub struct Hub {
    /// `https://huggingface.co`, or a mirror (`HF_ENDPOINT`).
    pub endpoint: String,
    /// Never download (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Draw download progress bars.
    pub progress: bool,
}

/// The files a model directory needs; everything else in a repo (READMEs, PyTorch `.bin`
/// duplicates, ONNX exports) is skipped.
fn wanted(file: &str) -> bool {
    !file.contains('/')
        && (file.ends_with(".json")
            || file.ends_with(".jinja")
            || file.ends_with(".safetensors")
            || file == "tokenizer.model")
}

/// Downloads the files of `repo_id` a model needs into the cache (the hub's cache layout, so
/// Python tools reuse them) with the hf-hub crate, and returns the snapshot directory.
pub fn download_model(repo_id: &str, cache_dir: &Path, hub: &Hub) -> Result<PathBuf, Error> {
    use hf_hub::{Cache, api::sync::ApiBuilder};
    let err = |e: hf_hub::api::sync::ApiError| {
        Error::Resolve(format!("downloading {repo_id} from {}: {e}", hub.endpoint))
    };
    let api = ApiBuilder::from_cache(Cache::new(cache_dir.to_path_buf()))
        .with_endpoint(hub.endpoint.trim_end_matches('/').to_string())
        .with_progress(hub.progress)
        .build()
        .map_err(err)?;
    let repo = api.model(repo_id.to_string());
    let info = repo.info().map_err(err)?;
    let files: Vec<String> = info
        .siblings
        .iter()
        .map(|s| s.rfilename.clone())
        .filter(|f| wanted(f))
        .collect();
    if !files.iter().any(|f| f == "config.json") {
        return Err(Error::Resolve(format!(
            "{repo_id} on {} has no config.json: not a model repository",
            hub.endpoint
        )));
    }
    let mut dir = None;
    for file in &files {
        let path = repo.get(file).map_err(err)?;
        dir.get_or_insert_with(|| path.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    dir.ok_or_else(|| Error::Resolve(format!("{repo_id}: nothing to download")))
}

/// Resolves `spec` to a model directory holding `config.json`: a local directory, a repo id in
/// the cache, or (unless offline) a repo id downloaded into the cache.
pub fn resolve_model_or_download(
    spec: &str,
    cache_dir: &Path,
    hub: &Hub,
) -> Result<PathBuf, Error> {
    match resolve_model(spec, cache_dir) {
        Err(Error::Resolve(message))
            if is_repo_id(spec) && !Path::new(spec).exists() && !hub.offline =>
        {
            download_model(spec, cache_dir, hub)
                .map_err(|e| Error::Resolve(format!("{e}\n\n{message}")))
        }
        other => other,
    }
}

/// Resolves `spec` to a model directory holding `config.json` without any network access.
pub fn resolve_model(spec: &str, cache_dir: &Path) -> Result<PathBuf, Error> {
    let path = Path::new(spec);
    if path.is_dir() {
        if !path.join("config.json").exists() {
            // A folder of llama.cpp GGUF files is named as such.
            crate::quant::check_loadable(path)?;
            return Err(Error::Resolve(format!(
                "{spec} is a directory but has no config.json: not a Hugging Face model directory"
            )));
        }
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        // A GGUF file is named as such.
        crate::quant::check_loadable(path)?;
        return Err(Error::Resolve(format!(
            "{spec} is a file; --model takes a model directory or a repo id"
        )));
    }
    if !is_repo_id(spec) {
        return Err(Error::Resolve(format!("{spec}: no such directory")));
    }
    let repo = cache_dir.join(format!("models--{}", spec.replace('/', "--")));
    if let Some(dir) = cached_snapshot(&repo) {
        return Ok(dir);
    }
    Err(Error::Resolve(format!(
        "{spec} is not a local directory and is not in the Hugging Face cache at {cache}.\n\
         This machine cannot download it. On a machine with network access run\n\
         \x20   huggingface-cli download {spec} --local-dir {name}\n\
         (set HF_ENDPOINT to use a mirror, e.g. HF_ENDPOINT=https://hf-mirror.com), copy the folder here\n\
         and pass --model {name}; or copy that machine's cache folder models--{flat} into {cache}.",
        cache = cache_dir.display(),
        name = spec.rsplit('/').next().unwrap_or(spec),
        flat = spec.replace('/', "--"),
    )))
}

/// The snapshot `refs/main` points at, else the only (or newest) snapshot, if it has a config.
fn cached_snapshot(repo: &Path) -> Option<PathBuf> {
    let snapshots = repo.join("snapshots");
    if let Ok(hash) = std::fs::read_to_string(repo.join("refs/main")) {
        let hash = hash.trim();
        if !hash.is_empty() && !hash.contains(['/', '\\']) && !hash.starts_with('.') {
            let dir = snapshots.join(hash);
            if dir.join("config.json").exists() {
                return Some(dir);
            }
        }
    }
    let mut candidates: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("config.json").exists())
        .map(|p| {
            (
                p.metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH),
                p,
            )
        })
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, p)| p)
}
