//! Receiving an upload while it streams in: counts bytes against the limit, hashes, and keeps
//! the first bytes for sniffing. A body up to `memory_limit` bytes is kept in memory (no file
//! written, nothing read back); a larger one spills to a temporary file as soon as it passes
//! that size, so memory per upload stays bounded whatever its size.

use std::path::Path;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};

use crate::error::ApiError;
use crate::sniff::SNIFF_LEN;

/// How much of an oversized body is read and discarded before answering 413.
const DRAIN_AFTER_LIMIT: u64 = 8 * 1024 * 1024;

/// Where a received body is.
#[derive(Debug)]
pub enum Body {
    Memory(Bytes),
    File(tempfile::TempPath),
}

/// A fully received upload.
#[derive(Debug)]
pub struct Spooled {
    pub body: Body,
    pub size: u64,
    pub sha256: String,
    pub head: Vec<u8>,
}

/// What a body being received has so far: its size, hash and head, and the bytes not yet written
/// to its file (all of them while it fits in memory).
struct Receiving {
    memory: BytesMut,
    hasher: Sha256,
    head: Vec<u8>,
    size: u64,
    limit: u64,
    memory_limit: u64,
}

impl Receiving {
    fn new(limit: u64, memory_limit: u64) -> Self {
        Self {
            memory: BytesMut::new(),
            hasher: Sha256::new(),
            head: Vec::with_capacity(SNIFF_LEN),
            size: 0,
            limit,
            memory_limit,
        }
    }

    /// Takes `chunk`; false once the body is over the limit (the chunk is counted, not kept).
    fn push(&mut self, chunk: &[u8]) -> bool {
        self.size += chunk.len() as u64;
        if self.size > self.limit {
            return false;
        }
        if self.head.len() < SNIFF_LEN {
            let take = (SNIFF_LEN - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..take]);
        }
        self.hasher.update(chunk);
        self.memory.extend_from_slice(chunk);
        true
    }

    /// The bytes to write to the file now, if it is time: as soon as the body outgrows memory,
    /// then `WRITE_BATCH` at a time.
    fn due(&mut self, spilled: bool) -> Option<BytesMut> {
        (self.size > self.memory_limit && (!spilled || self.memory.len() >= WRITE_BATCH))
            .then(|| std::mem::take(&mut self.memory))
    }

    /// The received body: in memory, or (spilled) in `file` once the rest is written to it.
    fn finish(self, file: Option<(std::fs::File, tempfile::TempPath)>) -> std::io::Result<Spooled> {
        let body = match file {
            None => Body::Memory(self.memory.freeze()),
            Some((mut f, path)) => {
                f.write_all(&self.memory)?;
                f.flush()?;
                Body::File(path)
            }
        };
        Ok(Spooled {
            body,
            size: self.size,
            sha256: hex(&self.hasher.finalize()),
            head: self.head,
        })
    }
}

fn internal(e: std::io::Error) -> ApiError {
    ApiError::Internal {
        internal: format!("spool file: {e}"),
    }
}

fn new_file(dir: &Path) -> std::io::Result<(std::fs::File, tempfile::TempPath)> {
    Ok(tempfile::Builder::new()
        .prefix("upload-")
        .tempfile_in(dir)?
        .into_parts())
}

/// Receives `body`: in memory while it fits in `memory_limit` bytes, else in a new temporary
/// file in `dir`; fails with `TooLarge` as soon as more than `limit` bytes arrived.
pub async fn spool<S, E>(
    dir: &Path,
    body: S,
    limit: u64,
    memory_limit: u64,
) -> Result<Spooled, ApiError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::fmt::Display,
{
    let mut receiving = Receiving::new(limit, memory_limit);
    // Spilled: the file, written a few MiB at a time on the blocking pool (not one system call
    // hop per network chunk).
    let mut file: Option<(std::fs::File, tempfile::TempPath)> = None;
    let mut body = std::pin::pin!(body);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest {
            detail: format!("the upload body could not be read: {e}"),
        })?;
        if !receiving.push(&chunk) {
            // Read on (discarding) for a while, so that a client still sending can finish and
            // read the 413 instead of seeing its connection reset; past that, cut it off.
            let mut size = receiving.size;
            while size <= limit + DRAIN_AFTER_LIMIT {
                match body.next().await {
                    Some(Ok(chunk)) => size += chunk.len() as u64,
                    _ => break,
                }
            }
            return Err(ApiError::TooLarge { limit });
        }
        if let Some(pending) = receiving.due(file.is_some()) {
            let dir = dir.to_owned();
            let taken = file.take();
            file = Some(
                tokio::task::spawn_blocking(move || -> std::io::Result<_> {
                    let (mut f, path) = match taken {
                        Some(open) => open,
                        None => new_file(&dir)?,
                    };
                    f.write_all(&pending)?;
                    Ok((f, path))
                })
                .await
                .map_err(|e| internal(std::io::Error::other(e)))?
                .map_err(internal)?,
            );
        }
    }
    tokio::task::spawn_blocking(move || receiving.finish(file))
        .await
        .map_err(|e| internal(std::io::Error::other(e)))?
        .map_err(internal)
}

/// As `spool`, from a blocking reader (a file inside an archive), on the calling thread. A read
/// error is the body's fault (`BadRequest`, naming what was read).
pub fn spool_reader(
    dir: &Path,
    mut reader: impl Read,
    limit: u64,
    memory_limit: u64,
) -> Result<Spooled, ApiError> {
    let mut receiving = Receiving::new(limit, memory_limit);
    let mut file: Option<(std::fs::File, tempfile::TempPath)> = None;
    let mut chunk = vec![0; 256 * 1024];
    loop {
        let n = reader.read(&mut chunk).map_err(|e| ApiError::BadRequest {
            detail: format!("could not be read: {e}"),
        })?;
        if n == 0 {
            break;
        }
        if !receiving.push(&chunk[..n]) {
            return Err(ApiError::TooLarge { limit });
        }
        if let Some(pending) = receiving.due(file.is_some()) {
            let (f, _) = match &mut file {
                Some(open) => open,
                None => file.insert(new_file(dir).map_err(internal)?),
            };
            f.write_all(&pending).map_err(internal)?;
        }
    }
    receiving.finish(file).map_err(internal)
}

/// Bytes gathered before each write to a spilled upload's file.
const WRITE_BATCH: usize = 4 * 1024 * 1024;

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
        // Kept in memory (11 bytes fit in 100), and spilled to a file (they do not fit in 4):
        // the same size, hash, head and bytes either way.
        for memory_limit in [100, 4] {
            let s = spool(
                dir.path(),
                chunks(&[b"hello ", b"world"]),
                100,
                memory_limit,
            )
            .await
            .unwrap();
            assert_eq!(s.size, 11);
            assert_eq!(s.head, b"hello world");
            assert_eq!(
                s.sha256,
                "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
            );
            match s.body {
                Body::Memory(b) if memory_limit == 100 => assert_eq!(&b[..], b"hello world"),
                Body::File(path) if memory_limit == 4 => {
                    assert_eq!(std::fs::read(&path).unwrap(), b"hello world");
                }
                other => panic!("{memory_limit}: {other:?}"),
            }
        }
        // The spilled file is gone with the upload.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn stops_at_the_limit_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = spool(dir.path(), chunks(&[b"12345", b"67890"]), 7, 2)
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::TooLarge { limit: 7 }));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
