//! Where photos and camera frames are kept: a folder (the default, on one box or mounted by
//! every replica) or S3-compatible object storage, through the `object_store` crate.
//!
//! Names are relative paths the server makes from content hashes and event ids
//! (`images/ab/<sha256>.jpg`, `events/<id>.jpg`); nothing a client sends becomes one. A `put`
//! is durable when it returns (a folder: temp file, fsync, rename, fsync of the folder; S3: the
//! PUT answered), so a row committed after it never names a missing photo. Writing a name that
//! is there already is harmless: the same name always holds the same bytes.
//!
//! The interface is blocking (the server calls it from its blocking pool, the camera loop from
//! its thread); object storage runs on a small runtime the store owns.
//!
//! ```
//! let dir = tempfile::tempdir().unwrap();
//! let photos = inspector_photos::PhotoStore::open(dir.path().to_str().unwrap()).unwrap();
//! photos.put("images/ab/abc.png", b"png").unwrap();
//! assert_eq!(photos.get("images/ab/abc.png").unwrap().as_deref(), Some(&b"png"[..]));
//! assert!(photos.get("images/cd/none.png").unwrap().is_none());
//! ```
//!
//! S3: `s3://BUCKET[/PREFIX]`, with the endpoint, region and credentials from the usual
//! variables (`AWS_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint such as a local test server); path-style
//! requests, so any S3-compatible server works.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use object_store::{ObjectStore, PutPayload, aws::AmazonS3Builder, path::Path as ObjectPath};

/// Errors naming the photo and the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("photo store {store}: {message}")]
    Open { store: String, message: String },
    #[error("{what} {name} in {store}: {message}")]
    Io {
        what: &'static str,
        name: String,
        store: String,
        message: String,
    },
    #[error("`{0}` is not a photo name the server makes")]
    BadName(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A photo store.
pub struct PhotoStore {
    kind: Kind,
}

enum Kind {
    Folder(PathBuf),
    Object {
        store: Arc<dyn ObjectStore>,
        prefix: String,
        shown: String,
        /// `None` only while the store is dropped.
        rt: Option<tokio::runtime::Runtime>,
    },
}

impl Drop for PhotoStore {
    /// The runtime may be dropped inside another (a server's last handle may go in a task):
    /// it is shut down without waiting there.
    fn drop(&mut self) {
        if let Kind::Object { rt, .. } = &mut self.kind
            && let Some(rt) = rt.take()
        {
            rt.shutdown_background();
        }
    }
}

/// A relative name the server makes: segments of ASCII letters, digits, `_`, `-` and `.`,
/// none empty or starting with a dot.
fn checked(name: &str) -> Result<&str> {
    let ok = !name.is_empty()
        && name.split('/').all(|seg| {
            !seg.is_empty()
                && !seg.starts_with('.')
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        });
    if ok {
        Ok(name)
    } else {
        Err(Error::BadName(name.to_string()))
    }
}

impl PhotoStore {
    /// `s3://BUCKET[/PREFIX]` for object storage, anything else a folder (created on first put).
    pub fn open(spec: &str) -> Result<PhotoStore> {
        Self::open_with(spec, &[])
    }

    /// As [`PhotoStore::open`], with S3 settings (`object_store`'s keys, such as `aws_endpoint`
    /// or `aws_access_key_id`) over those from the environment.
    pub fn open_with(spec: &str, settings: &[(&str, &str)]) -> Result<PhotoStore> {
        let Some(rest) = spec.strip_prefix("s3://") else {
            return Ok(PhotoStore::folder(Path::new(spec)));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let fail = |message: String| Error::Open {
            store: spec.to_string(),
            message,
        };
        if bucket.is_empty() {
            return Err(fail("no bucket: write s3://BUCKET[/PREFIX]".into()));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            builder = builder.with_region("us-east-1");
        }
        for (key, value) in settings {
            let key = key
                .parse()
                .map_err(|e: object_store::Error| fail(e.to_string()))?;
            builder = builder.with_config(key, *value);
        }
        let store = builder.build().map_err(|e| fail(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("inspector-photos")
            .enable_all()
            .build()
            .map_err(|e| fail(e.to_string()))?;
        Ok(PhotoStore {
            kind: Kind::Object {
                store: Arc::new(store),
                prefix: prefix.trim_matches('/').to_string(),
                shown: spec.to_string(),
                rt: Some(rt),
            },
        })
    }

    /// A folder.
    pub fn folder(dir: &Path) -> PhotoStore {
        PhotoStore {
            kind: Kind::Folder(dir.to_path_buf()),
        }
    }

    /// The folder, when this store is one.
    pub fn as_folder(&self) -> Option<&Path> {
        match &self.kind {
            Kind::Folder(d) => Some(d),
            Kind::Object { .. } => None,
        }
    }

    /// What to call the store in messages (no credentials: they never are in the spec).
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Folder(d) => d.display().to_string(),
            Kind::Object { shown, .. } => shown.clone(),
        }
    }

    fn object_path(prefix: &str, name: &str) -> ObjectPath {
        if prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{prefix}/{name}"))
        }
    }

    /// Runs `f` on the store's runtime and waits, from any thread (an async one included: the
    /// wait then happens on a scoped thread).
    fn block<T: Send>(
        rt: &Option<tokio::runtime::Runtime>,
        f: impl std::future::Future<Output = T> + Send,
    ) -> T {
        let rt = rt
            .as_ref()
            .expect("the runtime is only taken when the store is dropped");
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| {
                s.spawn(|| rt.block_on(f))
                    .join()
                    .expect("a photo store call panicked")
            })
        } else {
            rt.block_on(f)
        }
    }

    fn io(&self, what: &'static str, name: &str, message: impl ToString) -> Error {
        Error::Io {
            what,
            name: name.to_string(),
            store: self.describe(),
            message: message.to_string(),
        }
    }

    /// Stores `bytes` under `name`, durably; a name that is there already is left as it is.
    pub fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let name = checked(name)?;
        match &self.kind {
            Kind::Folder(dir) => {
                put_file(dir, name, bytes).map_err(|e| self.io("writing", name, e))
            }
            Kind::Object {
                store, prefix, rt, ..
            } => {
                let path = Self::object_path(prefix, name);
                let payload = PutPayload::from(bytes.to_vec());
                Self::block(rt, store.put(&path, payload))
                    .map(|_| ())
                    .map_err(|e| self.io("writing", name, e))
            }
        }
    }

    /// The bytes under `name`, or `None` when there are none.
    pub fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let name = checked(name)?;
        match &self.kind {
            Kind::Folder(dir) => match std::fs::read(dir.join(name)) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(self.io("reading", name, e)),
            },
            Kind::Object {
                store, prefix, rt, ..
            } => {
                let path = Self::object_path(prefix, name);
                let got = Self::block(rt, async {
                    match store.get(&path).await {
                        Ok(r) => r.bytes().await.map(Some),
                        Err(object_store::Error::NotFound { .. }) => Ok(None),
                        Err(e) => Err(e),
                    }
                });
                got.map(|b| b.map(|b| b.to_vec()))
                    .map_err(|e| self.io("reading", name, e))
            }
        }
    }

    /// Whether `name` is stored.
    pub fn exists(&self, name: &str) -> Result<bool> {
        let name = checked(name)?;
        match &self.kind {
            Kind::Folder(dir) => Ok(dir.join(name).is_file()),
            Kind::Object {
                store, prefix, rt, ..
            } => {
                let path = Self::object_path(prefix, name);
                match Self::block(rt, store.head(&path)) {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::NotFound { .. }) => Ok(false),
                    Err(e) => Err(self.io("looking up", name, e)),
                }
            }
        }
    }
}

/// Writes a file atomically and syncs it and the folders leading to it, unless it is there.
fn put_file(dir: &Path, name: &str, bytes: &[u8]) -> std::result::Result<(), String> {
    let path = dir.join(name);
    if path.is_file() {
        return Ok(());
    }
    let parent = path.parent().ok_or("a photo name has no folder")?;
    let created = !parent.is_dir();
    std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    inspector_dataset::write_atomic(&path, bytes).map_err(|e| e.to_string())?;
    let sync = |d: &Path| {
        std::fs::File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("syncing {}: {e}", d.display()))
    };
    sync(parent)?;
    if created {
        for d in parent.ancestors().skip(1).take(2) {
            sync(d)?;
        }
    }
    Ok(())
}
