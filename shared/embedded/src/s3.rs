//! The embedded S3 server: s3s-fs serving a local folder over HTTP on 127.0.0.1, in process.
//!
//! s3s-fs moves file bytes through tokio's file API in 4 KiB (reads) and 8 KiB (writes) pieces,
//! each a hop to the blocking pool and back, and hashes every PUT with MD5 for its ETag. `Files`
//! wraps it: a GET of a whole object streams the file in `CHUNK` (1 MiB) pieces, and a plain PUT
//! (`PlainPut`) is written in such pieces with an XXH3 ETag, in the layout s3s-fs reads back.
//! Everything else (metadata, checksums, Content-MD5, conditions, listing, multipart, ranges)
//! is s3s-fs's own.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use s3s::crypto::Checksum;
use s3s::dto::{self, StreamingBlob};
use s3s::{S3, S3Request, S3Response, S3Result, s3_error};

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
                tmp_counter: AtomicU64::new(0),
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
    /// Names the files plain PUTs write aside before renaming them into place.
    tmp_counter: AtomicU64,
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
        if let Some(object) = self.plain_put(&req) {
            let body = req
                .input
                .body
                .take()
                .ok_or_else(|| s3_error!(IncompleteBody))?;
            let e_tag = object.write(body).await?;
            return Ok(S3Response::new(dto::PutObjectOutput {
                e_tag: Some(dto::ETag::Strong(e_tag)),
                ..Default::default()
            }));
        }
        // Anything else s3s-fs checks and stores itself, given the body in `CHUNK` pieces so
        // that it writes each at once instead of 8 KiB at a time.
        if let Some(body) = req.input.body.take() {
            req.input.body = Some(StreamingBlob::wrap(in_pieces(body, CHUNK)));
        }
        self.fs.put_object(req).await
    }
}

impl Files {
    /// Where a PUT that asks for nothing but storing its body with a content type (and
    /// perhaps a Content-MD5) goes: no checksums, conditions, metadata or storage class, a
    /// plain key in an existing bucket. `None` leaves the request to s3s-fs.
    fn plain_put(&self, req: &S3Request<dto::PutObjectInput>) -> Option<PlainPut> {
        let i = &req.input;
        let asks_more = i.checksum_algorithm.is_some()
            || i.checksum_crc32.is_some()
            || i.checksum_crc32c.is_some()
            || i.checksum_crc64nvme.is_some()
            || i.checksum_sha1.is_some()
            || i.checksum_sha256.is_some()
            || i.if_match.is_some()
            || i.if_none_match.is_some()
            || i.storage_class.is_some()
            || i.metadata.is_some()
            || i.content_encoding.is_some()
            || i.content_disposition.is_some()
            || i.content_language.is_some()
            || i.cache_control.is_some()
            || i.expires.is_some()
            || i.website_redirect_location.is_some()
            || req.trailing_headers.is_some()
            || i.body.is_none()
            || i.key.ends_with('/');
        if asks_more || !self.root.join(&i.bucket).is_dir() {
            return None;
        }
        let path = self.object_path(&i.bucket, &i.key)?;
        // Named so that s3s-fs deletes what a crash leaves of them when it starts.
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = |what: &str| self.root.join(format!(".tmp.put-{n}{what}.internal.part"));
        Some(PlainPut {
            tmp: [tmp(""), tmp("-attributes"), tmp("-info")],
            path,
            attributes: self.root.join(side_file(&i.bucket, &i.key, "metadata")),
            info: self.root.join(side_file(&i.bucket, &i.key, "internal")),
            content_type: i.content_type.clone(),
            content_md5: i.content_md5.clone(),
        })
    }
}

/// s3s-fs's name for an object's side file of `kind` ("metadata": its content type and other
/// attributes, "internal": its ETag), in the root beside the buckets.
fn side_file(bucket: &str, key: &str, kind: &str) -> String {
    let encode = |s: &str| base64_simd::URL_SAFE_NO_PAD.encode_to_string(s);
    format!(
        ".bucket-{}.object-{}.{kind}.json",
        encode(bucket),
        encode(key)
    )
}

/// A plain PUT, stored as s3s-fs stores one (the object file, then its attributes and ETag in
/// the side files s3s-fs reads back for GET, HEAD and listing), with two differences: the body
/// is written in `CHUNK` pieces with one blocking-pool hop each (the last piece and the side
/// files share one), and the ETag is the body's XXH3-128 instead of its MD5, a hash pass of
/// about 5 ms for a 3 MB photo. S3 promises only that an ETag changes with the content (those
/// of multipart and KMS-encrypted objects are not MD5s either); a Content-MD5 the client sends
/// is still checked.
struct PlainPut {
    /// Where the body, the attributes and the ETag are written before their renames.
    tmp: [PathBuf; 3],
    path: PathBuf,
    attributes: PathBuf,
    info: PathBuf,
    content_type: Option<String>,
    /// The body's MD5 as the client sent it (base64), checked before the body is renamed
    /// into place (s3s-fs checks only after, leaving a refused body stored).
    content_md5: Option<String>,
}

impl PlainPut {
    /// Writes `body` and answers its ETag. Nothing is visible under the key until the whole
    /// body has arrived (and passed s3s's check of a signed payload digest): the file is
    /// written aside and renamed into place; what was written aside is removed if that fails.
    async fn write(self, body: StreamingBlob) -> S3Result<String> {
        let tmp = self.tmp.clone();
        let written = self.store(body).await;
        if written.is_err() {
            for tmp in &tmp {
                let _ = tokio::fs::remove_file(tmp).await;
            }
        }
        written
    }

    async fn store(self, body: StreamingBlob) -> S3Result<String> {
        let mut pieces = std::pin::pin!(in_pieces(body, CHUNK));
        let mut hash = xxhash_rust::xxh3::Xxh3::new();
        let mut md5 = self.content_md5.is_some().then(s3s::crypto::Md5::new);
        let mut file: Option<std::fs::File> = None;
        let mut last = Bytes::new();
        while let Some(piece) = pieces.next().await {
            let piece = piece.map_err(|e| s3_error!(IncompleteBody, "reading the body: {e}"))?;
            hash.update(&piece);
            if let Some(md5) = &mut md5 {
                md5.update(&piece);
            }
            let ready = std::mem::replace(&mut last, piece);
            if ready.is_empty() {
                continue;
            }
            let tmp = self.tmp[0].clone();
            file = Some(
                blocking(move || {
                    let mut f = match file {
                        Some(f) => f,
                        None => std::fs::File::create(&tmp)?,
                    };
                    f.write_all(&ready)?;
                    Ok(f)
                })
                .await?,
            );
        }
        let md5_refused = match (&self.content_md5, md5) {
            (Some(expected), Some(md5)) => {
                let sent = base64_simd::STANDARD.decode_to_vec(expected);
                (sent.ok().as_deref() != Some(&md5.finalize()[..]))
                    .then(|| s3_error!(BadDigest, "the body does not match its Content-MD5"))
            }
            _ => None,
        };
        if let Some(refused) = md5_refused {
            return Err(refused);
        }
        let e_tag = format!("{:032x}", hash.digest128());
        let attributes = serde_json::json!({ "content_type": self.content_type }).to_string();
        let info = serde_json::json!({ "e_tag": e_tag }).to_string();
        let written = e_tag.clone();
        blocking(move || {
            let mut f = match file {
                Some(f) => f,
                None => std::fs::File::create(&self.tmp[0])?,
            };
            f.write_all(&last)?;
            drop(f);
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let [body, attributes_tmp, info_tmp] = &self.tmp;
            std::fs::rename(body, &self.path)?;
            std::fs::write(attributes_tmp, attributes)?;
            std::fs::rename(attributes_tmp, &self.attributes)?;
            std::fs::write(info_tmp, info)?;
            std::fs::rename(info_tmp, &self.info)
        })
        .await?;
        Ok(written)
    }
}

/// Runs file work on the blocking pool, answering an S3 internal error if it fails.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> S3Result<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(s3_error!(InternalError, "writing the object: {e}")),
        Err(e) => Err(s3_error!(InternalError, "writing the object: {e}")),
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
