//! Spooling an upload to a local temporary file while it streams in: counts bytes against the
//! limit, hashes, and keeps the first bytes for sniffing. The body is never held in memory.

use std::path::Path;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::error::ApiError;
use crate::sniff::SNIFF_LEN;

/// How much of an oversized body is read and discarded before answering 413.
const DRAIN_AFTER_LIMIT: u64 = 8 * 1024 * 1024;

/// A fully received upload on local disk.
#[derive(Debug)]
pub struct Spooled {
    pub file: tempfile::TempPath,
    pub size: u64,
    pub sha256: String,
    pub head: Vec<u8>,
}

/// Writes `body` to a new temporary file in `dir`, failing with `TooLarge` as soon as more than
/// `limit` bytes arrived.
pub async fn spool<S, E>(dir: &Path, body: S, limit: u64) -> Result<Spooled, ApiError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::fmt::Display,
{
    let internal = |e: std::io::Error| ApiError::Internal {
        internal: format!("spool file: {e}"),
    };
    let temp = tempfile::Builder::new()
        .prefix("upload-")
        .tempfile_in(dir)
        .map_err(internal)?;
    let (std_file, path) = temp.into_parts();
    let mut file = tokio::fs::File::from_std(std_file);
    let mut hasher = Sha256::new();
    let mut head = Vec::with_capacity(SNIFF_LEN);
    let mut size: u64 = 0;
    let mut body = std::pin::pin!(body);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest {
            detail: format!("the upload body could not be read: {e}"),
        })?;
        size += chunk.len() as u64;
        if size > limit {
            // Read on (discarding) for a while, so that a client still sending can finish and
            // read the 413 instead of seeing its connection reset; past that, cut it off.
            while size <= limit + DRAIN_AFTER_LIMIT {
                match body.next().await {
                    Some(Ok(chunk)) => size += chunk.len() as u64,
                    _ => break,
                }
            }
            return Err(ApiError::TooLarge { limit });
        }
        if head.len() < SNIFF_LEN {
            let take = (SNIFF_LEN - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..take]);
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(internal)?;
    }
    file.flush().await.map_err(internal)?;
    Ok(Spooled {
        file: path,
        size,
        sha256: hex(&hasher.finalize()),
        head,
    })
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
        futures::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn hashes_and_keeps_the_head() {
        let dir = tempfile::tempdir().unwrap();
        let s = spool(dir.path(), chunks(&[b"hello ", b"world"]), 100)
            .await
            .unwrap();
        assert_eq!(s.size, 11);
        assert_eq!(s.head, b"hello world");
        assert_eq!(
            s.sha256,
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        assert_eq!(std::fs::read(&s.file).unwrap(), b"hello world");
    }

    #[tokio::test]
    async fn stops_at_the_limit_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = spool(dir.path(), chunks(&[b"12345", b"67890"]), 7)
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::TooLarge { limit: 7 }));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
