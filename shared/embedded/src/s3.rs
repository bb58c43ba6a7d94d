//! The embedded S3 server: s3s-fs serving a local folder over HTTP on 127.0.0.1, in process.
//!
//! s3s-fs moves file bytes through tokio's file API in 4 KiB (reads) and 8 KiB (writes) pieces,
//! each a hop to the blocking pool and back: thousands of thread wake-ups per photo. `Files`
//! wraps it so that whole-object reads and writes move `CHUNK` (1 MiB) at a time: a GET streams
//! the file in those pieces, a PUT hands s3s-fs its body in them. Everything else
//! (metadata, checksums, ETags, listing, multipart, ranges) is s3s-fs's own.

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use s3s::dto::{self, StreamingBlob};
use s3s::{S3, S3Request, S3Response, S3Result};

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
            let mut b = S3ServiceBuilder::new(Files {
                fs,
                root: root.to_owned(),
            });
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

/// Bytes moved between a file and the network at a time.
const CHUNK: usize = 1024 * 1024;

/// s3s-fs with whole-object reads and writes in `CHUNK` pieces.
struct Files {
    fs: s3s_fs::FileSystem,
    root: PathBuf,
}

impl Files {
    /// The file of `key` in `bucket` as s3s-fs lays it out (`root/bucket/key`), for plain keys
    /// only: anything that could resolve elsewhere is left to s3s-fs.
    fn object_path(&self, bucket: &str, key: &str) -> Option<PathBuf> {
        let rel = Path::new(bucket).join(key);
        rel.components()
            .all(|c| matches!(c, Component::Normal(_)))
            .then(|| self.root.join(rel))
    }
}

/// Passes each operation on to s3s-fs.
macro_rules! delegate {
    ($($op:ident: $input:ident => $output:ident),* $(,)?) => {
        $(
            // Spelled as `async_trait` expands an `async fn`, which it cannot see inside a macro.
            fn $op<'life0, 'async_trait>(
                &'life0 self,
                req: S3Request<dto::$input>,
            ) -> std::pin::Pin<Box<dyn std::future::Future<Output = S3Result<S3Response<dto::$output>>> + Send + 'async_trait>>
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                self.fs.$op(req)
            }
        )*
    };
}

#[async_trait::async_trait]
impl S3 for Files {
    delegate! {
        create_bucket: CreateBucketInput => CreateBucketOutput,
        copy_object: CopyObjectInput => CopyObjectOutput,
        delete_bucket: DeleteBucketInput => DeleteBucketOutput,
        delete_object: DeleteObjectInput => DeleteObjectOutput,
        delete_objects: DeleteObjectsInput => DeleteObjectsOutput,
        get_bucket_location: GetBucketLocationInput => GetBucketLocationOutput,
        head_bucket: HeadBucketInput => HeadBucketOutput,
        head_object: HeadObjectInput => HeadObjectOutput,
        list_buckets: ListBucketsInput => ListBucketsOutput,
        list_objects: ListObjectsInput => ListObjectsOutput,
        list_objects_v2: ListObjectsV2Input => ListObjectsV2Output,
        create_multipart_upload: CreateMultipartUploadInput => CreateMultipartUploadOutput,
        upload_part: UploadPartInput => UploadPartOutput,
        upload_part_copy: UploadPartCopyInput => UploadPartCopyOutput,
        list_parts: ListPartsInput => ListPartsOutput,
        complete_multipart_upload: CompleteMultipartUploadInput => CompleteMultipartUploadOutput,
        abort_multipart_upload: AbortMultipartUploadInput => AbortMultipartUploadOutput,
    }

    async fn get_object(
        &self,
        req: S3Request<dto::GetObjectInput>,
    ) -> S3Result<S3Response<dto::GetObjectOutput>> {
        let whole = req.input.range.is_none() && req.input.part_number.is_none();
        let path = self.object_path(&req.input.bucket, &req.input.key);
        let mut response = self.fs.get_object(req).await?;
        let (true, Some(path), Some(size)) = (whole, path, response.output.content_length) else {
            return Ok(response);
        };
        // The same file in `CHUNK` pieces instead of s3s-fs's 4 KiB stream; its headers
        // (length, ETag, checksums) stay. Keys are written once, so the file is the one s3s-fs
        // opened; should it have been replaced meanwhile, the length tells and its stream is
        // kept.
        if let Ok(file) = tokio::fs::File::open(&path).await
            && let Ok(meta) = file.metadata().await
            && i64::try_from(meta.len()).ok() == Some(size)
        {
            let stream = Sized {
                inner: tokio_util::io::ReaderStream::with_capacity(file, CHUNK),
                remaining: meta.len(),
            };
            response.output.body = Some(StreamingBlob::new(stream));
        }
        Ok(response)
    }

    async fn put_object(
        &self,
        mut req: S3Request<dto::PutObjectInput>,
    ) -> S3Result<S3Response<dto::PutObjectOutput>> {
        // Handed on in `CHUNK` pieces, so that s3s-fs writes each at once instead of 8 KiB at
        // a time.
        if let Some(body) = req.input.body.take() {
            req.input.body = Some(StreamingBlob::wrap(in_pieces(body, CHUNK)));
        }
        self.fs.put_object(req).await
    }
}

/// The bytes of `body` in pieces of at least `size` bytes (the last may be shorter).
fn in_pieces(
    body: StreamingBlob,
    size: usize,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static {
    futures::stream::unfold(Some(body), move |body| async move {
        let mut body = body?;
        let mut piece = BytesMut::new();
        while piece.len() < size {
            match body.next().await {
                Some(Ok(chunk)) => piece.extend_from_slice(&chunk),
                Some(Err(e)) => return Some((Err(std::io::Error::other(e)), None)),
                None if piece.is_empty() => return None,
                None => return Some((Ok(piece.freeze()), None)),
            }
        }
        Some((Ok(piece.freeze()), Some(body)))
    })
}

/// A file's bytes that know how many are left, as s3s's own file streams do (it sizes the
/// response by them).
struct Sized {
    inner: tokio_util::io::ReaderStream<tokio::fs::File>,
    remaining: u64,
}

impl futures::Stream for Sized {
    type Item = Result<Bytes, s3s::StdError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_next(cx);
        if let std::task::Poll::Ready(Some(Ok(chunk))) = &polled {
            self.remaining = self.remaining.saturating_sub(chunk.len() as u64);
        }
        polled.map(|item| item.map(|r| r.map_err(Into::into)))
    }
}

impl s3s::stream::ByteStream for Sized {
    fn remaining_length(&self) -> s3s::stream::RemainingLength {
        s3s::stream::RemainingLength::new_exact(
            usize::try_from(self.remaining).unwrap_or(usize::MAX),
        )
    }
}
