//! Object storage. Wraps aws-sdk-s3 behind the few operations mediaflow needs; works against any
//! S3-compatible endpoint (AWS, MinIO, Ceph, R2, the embedded server). Only this crate links
//! aws-sdk-s3.

use std::path::Path;
use std::time::Duration;

use aws_runtime::auth::PayloadSigningOverride;
use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextMut;
use aws_sdk_s3::config::{
    BehaviorVersion, ConfigBag, Credentials, Intercept, Region, RequestChecksumCalculation,
    ResponseChecksumValidation, RuntimeComponents,
};
use aws_sdk_s3::error::{BoxError, DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

/// How mediaflow reaches object storage.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// S3 endpoint URL. Under `mediaflow up` with the embedded server this is filled in.
    pub endpoint: String,
    /// Region name used for request signing.
    pub region: String,
    /// Bucket holding uploads and derived objects; created at start-up if missing.
    pub bucket: String,
    /// Access key id.
    pub access_key: String,
    /// Secret access key.
    pub secret_key: String,
    /// Path-style addressing (`endpoint/bucket/key`); needed by most self-hosted servers.
    pub force_path_style: bool,
    /// Per-attempt timeout of one request, in milliseconds.
    pub timeout_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            endpoint: "http://127.0.0.1:9000".into(),
            region: "us-east-1".into(),
            bucket: "mediaflow".into(),
            access_key: "mediaflow".into(),
            secret_key: "mediaflow-secret".into(),
            force_path_style: true,
            timeout_ms: 30_000,
        }
    }
}

/// Why an object-store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object `{key}` not found")]
    NotFound { key: String },
    #[error("object `{key}` is {size} bytes, over the limit of {limit}")]
    TooLarge { key: String, size: u64, limit: u64 },
    #[error("object store request `{op}` on `{key}` failed: {message}")]
    Request {
        op: &'static str,
        key: String,
        message: String,
        transient: bool,
    },
    #[error("could not read local file {path}: {source}")]
    LocalFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether a retry later can succeed (server unreachable, timeouts, 5xx).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Request {
                transient: true,
                ..
            }
        )
    }
}

fn request_error<E, R>(op: &'static str, key: &str, err: &SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let transient = match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(e) => {
            matches!(
                e.err().code(),
                Some("SlowDown" | "InternalError" | "ServiceUnavailable")
            )
        }
        _ => false,
    };
    StoreError::Request {
        op,
        key: key.to_owned(),
        message: DisplayErrorContext(err).to_string(),
        transient,
    }
}

/// An object as listed or fetched.
#[derive(Clone, Debug)]
pub struct Object {
    pub bytes: Bytes,
    pub content_type: Option<String>,
}

/// An object being read: its size, if the server declared it, and its bytes as a stream.
pub struct ObjectStream {
    pub size: Option<u64>,
    pub content_type: Option<String>,
    pub body: std::pin::Pin<Box<dyn futures::Stream<Item = Result<Bytes, std::io::Error>> + Send>>,
}

impl std::fmt::Debug for ObjectStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStream")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// One bucket of an S3-compatible store.
#[derive(Clone, Debug)]
pub struct ObjectStore {
    client: aws_sdk_s3::Client,
    bucket: String,
}

impl ObjectStore {
    pub fn new(config: &StoreConfig) -> Self {
        let creds = Credentials::new(
            &config.access_key,
            &config.secret_key,
            None,
            None,
            "mediaflow-config",
        );
        let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
            .operation_attempt_timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_secs(5))
            .build();
        let s3 = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .endpoint_url(&config.endpoint)
            .credentials_provider(creds)
            .force_path_style(config.force_path_style)
            .timeout_config(timeouts)
            // Plain PUTs with Content-MD5-free bodies work with every S3 implementation.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        Self {
            client: aws_sdk_s3::Client::from_conf(s3),
            bucket: config.bucket.clone(),
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Creates the bucket unless it exists.
    pub async fn ensure_bucket(&self) -> Result<(), StoreError> {
        if self
            .client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .is_ok()
        {
            return Ok(());
        }
        match self
            .client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(e))
                if matches!(
                    e.err().code(),
                    Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(request_error("CreateBucket", &self.bucket, &e)),
        }
    }

    /// Uploads the local file at `path` to `key`, streaming it from disk.
    pub async fn put_file(
        &self,
        key: &str,
        path: &Path,
        content_type: &str,
    ) -> Result<(), StoreError> {
        // Read in large chunks: each read is a hop to the blocking pool, and the default
        // (4 KiB) made thousands of them per object.
        let body = ByteStream::read_from()
            .path(path)
            .buffer_size(FILE_CHUNK)
            .build()
            .await
            .map_err(|e| StoreError::LocalFile {
                path: path.display().to_string(),
                source: std::io::Error::other(e),
            })?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(body)
            .send()
            .await
            .map_err(|e| request_error("PutObject", key, &e))?;
        Ok(())
    }

    /// Uploads `bytes`, whose SHA-256 (lowercase hex) is `sha256`, to `key`. The request is
    /// signed with that digest, so the server still checks the body against it, while the
    /// client does not hash the body a second time (callers have hashed it already to record
    /// it).
    pub async fn put_bytes(
        &self,
        key: &str,
        bytes: Bytes,
        content_type: &str,
        sha256: &str,
    ) -> Result<(), StoreError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(bytes))
            .customize()
            .interceptor(SignedWith(sha256.to_owned()))
            .send()
            .await
            .map_err(|e| request_error("PutObject", key, &e))?;
        Ok(())
    }

    /// Fetches `key` whole, refusing objects larger than `limit` bytes (by their declared size
    /// before reading, and by counting while reading).
    pub async fn get(&self, key: &str, limit: u64) -> Result<Object, StoreError> {
        let too_large = |size| StoreError::TooLarge {
            key: key.to_owned(),
            size,
            limit,
        };
        let object = self.get_stream(key).await?;
        let declared = object.size.unwrap_or(0);
        if declared > limit {
            return Err(too_large(declared));
        }
        let mut body = object.body;
        let mut bytes = bytes::BytesMut::with_capacity(declared as usize);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| StoreError::Request {
                op: "GetObject",
                key: key.to_owned(),
                message: e.to_string(),
                transient: true,
            })?;
            if (bytes.len() + chunk.len()) as u64 > limit {
                return Err(too_large((bytes.len() + chunk.len()) as u64));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Object {
            bytes: bytes.freeze(),
            content_type: object.content_type,
        })
    }

    /// Opens `key` for streaming, without reading it into memory.
    pub async fn get_stream(&self, key: &str) -> Result<ObjectStream, StoreError> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => {
                return Err(StoreError::NotFound {
                    key: key.to_owned(),
                });
            }
            Err(e) => return Err(request_error("GetObject", key, &e)),
        };
        let size = out.content_length().and_then(|n| u64::try_from(n).ok());
        let content_type = out.content_type().map(str::to_owned);
        let key = key.to_owned();
        let body = futures::stream::try_unfold(out.body, move |mut body| {
            let key = key.clone();
            async move {
                match body.try_next().await {
                    Ok(Some(chunk)) => Ok(Some((chunk, body))),
                    Ok(None) => Ok(None),
                    Err(e) => Err(std::io::Error::other(format!("reading `{key}`: {e}"))),
                }
            }
        });
        Ok(ObjectStream {
            size,
            content_type,
            body: Box::pin(body),
        })
    }

    /// The same store, on another bucket of the same endpoint.
    pub fn in_bucket(&self, bucket: &str) -> Self {
        Self {
            client: self.client.clone(),
            bucket: bucket.to_owned(),
        }
    }

    /// Every object under `prefix`: (key, size), in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_continuation_token(token)
                .send()
                .await
                .map_err(|e| request_error("ListObjectsV2", prefix, &e))?;
            for o in page.contents() {
                if let Some(key) = o.key() {
                    out.push((key.to_owned(), o.size().map_or(0, |n| n.max(0) as u64)));
                }
            }
            token = page.next_continuation_token().map(str::to_owned);
            if token.is_none() {
                return Ok(out);
            }
        }
    }

    /// Whether `key` exists.
    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(e)) if e.err().is_not_found() => Ok(false),
            Err(e) => Err(request_error("HeadObject", key, &e)),
        }
    }

    /// Deletes `key`; deleting what is not there succeeds (S3 semantics), so a retry is safe.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| request_error("DeleteObject", key, &e))
    }

    /// A URL that lets anyone holding it GET `key` until it expires.
    pub async fn presigned_get(&self, key: &str, expires: Duration) -> Result<String, StoreError> {
        let cfg = PresigningConfig::expires_in(expires).map_err(|e| StoreError::Request {
            op: "Presign",
            key: key.to_owned(),
            message: e.to_string(),
            transient: false,
        })?;
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(cfg)
            .await
            .map_err(|e| request_error("Presign", key, &e))?;
        Ok(req.uri().to_owned())
    }
}

impl ObjectStore {
    /// Checks that the bucket is reachable.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| request_error("HeadBucket", &self.bucket, &e))?;
        Ok(())
    }
}

/// Bytes read from a local file at a time while it is uploaded.
const FILE_CHUNK: usize = 1024 * 1024;

/// Signs a request's payload with a SHA-256 the caller already has
/// (`x-amz-content-sha256: <digest>`) instead of the SDK hashing the body itself.
#[derive(Debug)]
struct SignedWith(String);

impl Intercept for SignedWith {
    fn name(&self) -> &'static str {
        "SignedWith"
    }

    fn modify_before_signing(
        &self,
        _context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        cfg.interceptor_state()
            .store_put(PayloadSigningOverride::Precomputed(self.0.clone()));
        Ok(())
    }
}
