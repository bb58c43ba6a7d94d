//! The embedded S3 server: s3s-fs serving a local folder over HTTP on 127.0.0.1, in process.

use std::net::SocketAddr;
use std::path::Path;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::EmbeddedError;

/// A running S3 server. Dropping it stops accepting connections.
#[derive(Debug)]
pub struct EmbeddedS3 {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl EmbeddedS3 {
    /// Serves `root` on `addr` (port 0 picks a free port), requiring the given credentials.
    pub async fn start(
        root: &Path,
        addr: SocketAddr,
        access_key: &str,
        secret_key: &str,
    ) -> Result<Self, EmbeddedError> {
        std::fs::create_dir_all(root)
            .map_err(|source| EmbeddedError::Spawn { what: "s3", source })?;
        let fs = s3s_fs::FileSystem::new(root)
            .map_err(|e| EmbeddedError::S3(s3s::S3Error::from(e).to_string()))?;
        let service = {
            let mut b = S3ServiceBuilder::new(fs);
            b.set_auth(SimpleAuth::from_single(access_key, secret_key));
            b.build()
        };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| EmbeddedError::Spawn {
                what: "s3 listener",
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| EmbeddedError::Spawn { what: "s3", source })?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let (socket, _) = tokio::select! {
                    () = token.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(conn) => conn,
                        Err(e) => {
                            tracing::warn!(error = %e, "s3 accept failed");
                            continue;
                        }
                    },
                };
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                let token = token.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = token.cancelled() => {}
                        _ = conn => {}
                    }
                });
            }
        });
        tracing::info!(%addr, root = %root.display(), "embedded s3 server ready");
        Ok(Self { addr, stop })
    }

    /// The endpoint URL for S3 clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for EmbeddedS3 {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
