//! `POST /v1/batches/{id}/zip`: a zip archive's files as items of batch `id`, each one taken as
//! if it had been uploaded on its own to `POST /v1/batches/{id}/media` under its base name (the
//! same checks, the same events). The archive is spooled to disk first (its directory is at its
//! end), then read one entry at a time.
//!
//! Bounded whatever the archive claims: at most `max_archive_bytes` received, at most
//! `max_archive_entries` entries, each entry at most `max_upload_bytes` once decompressed
//! (counted while it decompresses, not taken from its header), and one entry on disk besides the
//! archive. An entry that cannot be an item (unreadable, encrypted, a link, not a supported
//! image or video, a name the batch does not take) is listed with its reason and the rest go on;
//! directories, hidden files and macOS' `__MACOSX/` folders are skipped and listed.

use std::io::{Read, Seek};
use std::path::Path as FsPath;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use mediaflow_batches::Take;
use mediaflow_batches::spec::is_item_name;
use serde::Serialize;

use crate::spool::{self, Body, Spooled};
use crate::{Accepted, ApiError, Gateway, batches, check_batch, commit_upload, sniff};

/// What a zip archive's upload did, entry by entry.
#[derive(Debug, Serialize)]
pub struct ArchiveReport {
    pub batch_id: String,
    /// Entries in the archive, directories included.
    pub entries: usize,
    pub accepted: Vec<EntryAccepted>,
    pub rejected: Vec<EntryRejected>,
    /// Hidden files and `__MACOSX/` entries, not uploaded.
    pub skipped: Vec<String>,
}

/// An entry taken as an item of the batch.
#[derive(Debug, Serialize)]
pub struct EntryAccepted {
    /// Its path in the archive.
    pub entry: String,
    /// The batch item it is: its base name.
    pub item: String,
    #[serde(flatten)]
    pub upload: Accepted,
}

/// An entry that is not an item of the batch, and why: the problem its own upload would have
/// been answered with.
#[derive(Debug, Serialize)]
pub struct EntryRejected {
    pub entry: String,
    pub status: u16,
    pub code: &'static str,
    pub detail: String,
}

/// What an archive's entry is to a batch.
#[derive(Debug, PartialEq, Eq)]
pub enum EntryName {
    /// A file, as the item named by its base name.
    Item(String),
    /// A directory: nothing to upload.
    Directory,
    /// A hidden file or macOS metadata (`__MACOSX/`, `.DS_Store`, `._photo.jpg`).
    Skipped,
    /// A file whose base name cannot be an item's name.
    Invalid,
}

/// What the entry at `path` (as the archive names it) is to a batch; `mediaflow batch upload`
/// declares a zip's manifest by the same rule.
pub fn entry_name(path: &str) -> EntryName {
    if path.ends_with(['/', '\\']) {
        return EntryName::Directory;
    }
    let mut parts = path.split(['/', '\\']).filter(|p| !p.is_empty());
    let base = parts.next_back().unwrap_or_default();
    if base.starts_with('.') || parts.any(|p| p == "__MACOSX") {
        return EntryName::Skipped;
    }
    if is_item_name(base) {
        EntryName::Item(base.to_owned())
    } else {
        EntryName::Invalid
    }
}

trait Archive: Read + Seek + Send {}
impl<T: Read + Seek + Send> Archive for T {}

type ZipArchive = zip::ZipArchive<Box<dyn Archive>>;

/// `POST /v1/batches/{id}/zip`.
pub(crate) async fn upload_zip(
    State(gw): State<Gateway>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    match receive(&gw, &id, request).await {
        Ok(report) => {
            let status = if !report.accepted.is_empty() {
                StatusCode::ACCEPTED
            } else if !report.rejected.is_empty()
                && report.rejected.iter().all(|r| r.code == "unavailable")
            {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            (
                status,
                [(header::LOCATION, format!("/v1/batches/{}", report.batch_id))],
                Json(report),
            )
                .into_response()
        }
        Err(e) => {
            gw.inner.metrics.upload(e.code(), 0);
            e.into_response()
        }
    }
}

async fn receive(gw: &Gateway, id: &str, request: Request) -> Result<ArchiveReport, ApiError> {
    let _permit = gw.upload_permit()?;
    // Refused before a byte is read: no such batch, or one that takes no more items.
    match batches::store(gw).check(id, None).await? {
        Take::Taken | Take::NameNeeded => {}
        refused => {
            return Err(batches::refusal(refused).unwrap_or(ApiError::NotFound {
                what: "this batch".into(),
            }));
        }
    }
    let config = &gw.inner.config;
    let limit = config.max_archive_bytes;
    let declared_len = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_len.is_some_and(|n| n > limit) {
        return Err(ApiError::TooLarge { limit });
    }
    let body = request.into_body().into_data_stream();
    // Always on disk: an archive is read by seeking around in it.
    let spooled = spool::spool(&gw.inner.spool_dir, body, limit, 0).await?;
    if spooled.size == 0 {
        return Err(ApiError::EmptyBody);
    }
    let max_entries = config.max_archive_entries;
    let (archive, listing) = tokio::task::spawn_blocking(move || open(spooled, max_entries))
        .await
        .map_err(|e| ApiError::Internal {
            internal: format!("reading an archive: {e}"),
        })??;
    let archive = Arc::new(Mutex::new(archive));

    let mut report = ArchiveReport {
        batch_id: id.to_owned(),
        entries: listing.len(),
        accepted: Vec::new(),
        rejected: Vec::new(),
        skipped: Vec::new(),
    };
    for (index, path) in listing.into_iter().enumerate() {
        let name = match entry_name(&path) {
            EntryName::Item(name) => name,
            EntryName::Directory => continue,
            EntryName::Skipped => {
                report.skipped.push(path);
                continue;
            }
            EntryName::Invalid => {
                report.reject(
                    gw,
                    path,
                    ApiError::Refused {
                        status: StatusCode::UNPROCESSABLE_ENTITY,
                        code: "invalid-item-name",
                        title: "Invalid item name",
                        detail: "the file's name cannot be a batch item's (control characters, or \
                                 over 255 characters)"
                            .into(),
                    },
                );
                continue;
            }
        };
        let item = name.clone();
        let taken = async {
            check_batch(gw, Some(id), Some(&name)).await?;
            let dir = gw.inner.spool_dir.clone();
            let (limit, memory) = (config.max_upload_bytes, config.spool_memory_bytes);
            let archive = archive.clone();
            let spooled = tokio::task::spawn_blocking(move || {
                let mut archive = archive.lock().unwrap_or_else(PoisonError::into_inner);
                extract(&mut archive, index, &dir, limit, memory)
            })
            .await
            .map_err(|e| ApiError::Internal {
                internal: format!("reading an archive: {e}"),
            })??;
            if spooled.size == 0 {
                return Err(ApiError::EmptyBody);
            }
            let format = match sniff(&spooled.head) {
                Some(s) if s.supported => s,
                other => {
                    return Err(ApiError::UnsupportedMedia {
                        declared: None,
                        detected: other.map(|s| s.content_type),
                    });
                }
            };
            let gw = gw.clone();
            let batch = id.to_owned();
            // Committed as one unit, as a single upload is: not cut off by a disconnect.
            tokio::spawn(async move {
                commit_upload(&gw, spooled, format, Some(name), Some(batch)).await
            })
            .await
            .map_err(|e| ApiError::Internal {
                internal: format!("upload task: {e}"),
            })?
        }
        .await;
        match taken {
            Ok(upload) => {
                gw.inner.metrics.upload("accepted", upload.size);
                report.accepted.push(EntryAccepted {
                    entry: path,
                    item,
                    upload,
                });
            }
            Err(e) => report.reject(gw, path, e),
        }
    }
    tracing::info!(
        batch = %id,
        entries = report.entries,
        accepted = report.accepted.len(),
        rejected = report.rejected.len(),
        skipped = report.skipped.len(),
        "archive uploaded"
    );
    Ok(report)
}

impl ArchiveReport {
    fn reject(&mut self, gw: &Gateway, entry: String, error: ApiError) {
        gw.inner.metrics.upload(error.code(), 0);
        let (status, code, detail) = error.reported();
        self.rejected.push(EntryRejected {
            entry,
            status: status.as_u16(),
            code,
            detail,
        });
    }
}

/// Opens the spooled archive: the archive and its entries' paths, by index.
fn open(spooled: Spooled, max_entries: usize) -> Result<(ZipArchive, Vec<String>), ApiError> {
    let reader: Box<dyn Archive> = match spooled.body {
        Body::Memory(bytes) => Box::new(std::io::Cursor::new(bytes)),
        Body::File(path) => Box::new(ArchiveFile::open(path).map_err(|e| ApiError::Internal {
            internal: format!("reopening a spooled archive: {e}"),
        })?),
    };
    let not_zip = |e: zip::result::ZipError| ApiError::Refused {
        status: StatusCode::BAD_REQUEST,
        code: "bad-archive",
        title: "Not a readable zip archive",
        detail: format!("the body is not a readable zip archive: {e}"),
    };
    let archive = zip::ZipArchive::new(reader).map_err(not_zip)?;
    if archive.len() > max_entries {
        return Err(ApiError::Refused {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "too-many-entries",
            title: "Too many entries",
            detail: format!(
                "the archive has {} entries; at most {max_entries} are taken \
                 (gateway.max_archive_entries)",
                archive.len()
            ),
        });
    }
    let listing = (0..archive.len())
        .map(|i| {
            archive
                .name_for_index(i)
                .and_then(Result::ok)
                .map_or_else(|| format!("#{i}"), |n| n.into_owned())
        })
        .collect();
    Ok((archive, listing))
}

/// Decompresses entry `index` as an upload (bounded by `limit` as it decompresses); an entry that
/// cannot be read (encrypted, an unsupported compression, a bad checksum, a link) is its own
/// `BadRequest`.
fn extract(
    archive: &mut ZipArchive,
    index: usize,
    dir: &FsPath,
    limit: u64,
    memory: u64,
) -> Result<Spooled, ApiError> {
    let unreadable = |why: String| ApiError::Refused {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        code: "bad-entry",
        title: "Unreadable archive entry",
        detail: why,
    };
    let entry = archive
        .by_index(index)
        .map_err(|e| unreadable(format!("the entry cannot be read: {e}")))?;
    if entry.is_symlink() {
        return Err(unreadable(
            "the entry is a symbolic link, not a file".into(),
        ));
    }
    if entry.size() > limit {
        return Err(ApiError::TooLarge { limit });
    }
    spool::spool_reader(dir, entry, limit, memory).map_err(|e| match e {
        ApiError::BadRequest { detail } => unreadable(format!("the entry {detail}")),
        other => other,
    })
}

/// A spooled archive's file, removed when the archive is dropped.
struct ArchiveFile {
    file: std::fs::File,
    _path: tempfile::TempPath,
}

impl ArchiveFile {
    fn open(path: tempfile::TempPath) -> std::io::Result<Self> {
        Ok(Self {
            file: std::fs::File::open(&path)?,
            _path: path,
        })
    }
}

impl Read for ArchiveFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

impl Seek for ArchiveFile {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.file.seek(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_named_by_their_base_names() {
        assert_eq!(entry_name("a.jpg"), EntryName::Item("a.jpg".into()));
        assert_eq!(
            entry_name("holiday/day 1/a.jpg"),
            EntryName::Item("a.jpg".into())
        );
        assert_eq!(
            entry_name("win\\dir\\b.png"),
            EntryName::Item("b.png".into())
        );
        assert_eq!(entry_name("holiday/"), EntryName::Directory);
        assert_eq!(entry_name("holiday/"), EntryName::Directory);
        assert_eq!(entry_name("__MACOSX/holiday/._a.jpg"), EntryName::Skipped);
        assert_eq!(entry_name("holiday/.DS_Store"), EntryName::Skipped);
        assert_eq!(entry_name("bad\u{7}name.jpg"), EntryName::Invalid);
        assert_eq!(entry_name(&"x".repeat(300)), EntryName::Invalid);
        assert_eq!(
            entry_name("../../etc/a.jpg"),
            EntryName::Item("a.jpg".into())
        );
    }
}
