//! Test-only: an S3-compatible server on a free loopback port, storing objects in a folder
//! ([`s3s_fs`], the s3s project's file-system backend), with one access key. It runs on a thread
//! of its own until the handle is dropped.
//!
//! ```no_run
//! let dir = tempfile::tempdir().unwrap();
//! let s3 = inspector_s3_test_server::S3TestServer::start(dir.path(), &["photos"]).unwrap();
//! println!("{} {} {}", s3.endpoint, s3.access_key, s3.secret_key);
//! ```

use std::path::Path;

use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto::Builder as ConnBuilder,
};
use s3s::{auth::SimpleAuth, service::S3ServiceBuilder};

/// A running server.
pub struct S3TestServer {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl S3TestServer {
    /// Serves `root` (each subfolder a bucket; `buckets` are created) on a free port.
    pub fn start(root: &Path, buckets: &[&str]) -> std::io::Result<S3TestServer> {
        for b in buckets {
            std::fs::create_dir_all(root.join(b))?;
        }
        let (access_key, secret_key) = (
            "inspector-test".to_string(),
            "inspector-test-secret".to_string(),
        );
        let fs =
            s3s_fs::FileSystem::new(root).map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let service = {
            let mut b = S3ServiceBuilder::new(fs);
            b.set_auth(SimpleAuth::from_single(
                access_key.clone(),
                secret_key.clone(),
            ));
            b.build().into_shared()
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("s3-test-server".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                    .expect("a runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                    let http = ConnBuilder::new(TokioExecutor::new());
                    loop {
                        tokio::select! {
                            accepted = listener.accept() => {
                                let Ok((socket, _)) = accepted else { continue };
                                let conn = http
                                    .serve_connection(TokioIo::new(socket), service.clone())
                                    .into_owned();
                                tokio::spawn(async move {
                                    let _ = conn.await;
                                });
                            }
                            _ = &mut stopped => break,
                        }
                    }
                });
            })?;
        Ok(S3TestServer {
            endpoint,
            access_key,
            secret_key,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for S3TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
