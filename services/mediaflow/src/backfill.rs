//! `mediaflow backfill`: the S3-prefix source. Admits every existing object under a bucket
//! prefix into the pipeline, once: each object's media id is derived from its location and size,
//! so running the backfill again enqueues only what is new.

use anyhow::{Context, Result};
use futures::StreamExt;
use mediaflow_bus::Bus;
use mediaflow_db::Db;
use mediaflow_events::{BatchItem, ObjectRef};
use mediaflow_gateway::ingest::{Intake, record_and_announce};
use mediaflow_store::ObjectStore;
use sha2::{Digest, Sha256};

/// What a backfill did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Admitted and announced now.
    pub enqueued: usize,
    /// Admitted by an earlier run.
    pub already: usize,
    /// Left out, with why (empty, not a supported format).
    pub skipped: Vec<(String, String)>,
    /// The batch the objects admitted now were announced into (`--batch`).
    pub batch: Option<String>,
}

/// A batch to announce the admitted objects into: a count batch of as many items as objects
/// are admitted now (objects admitted by an earlier run are not in it).
#[derive(Clone, Debug)]
pub struct IntoBatch {
    pub name: String,
    pub failure_policy: mediaflow_coordination::FailurePolicy,
}

/// Namespace of backfilled media ids (UUID v5 over the object's location and size).
const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6d65_6469_6166_6c6f_7700_0000_0000_0002);

/// The media id of the object at `bucket`/`key` of `size` bytes: the same object, the same id.
pub fn media_id(bucket: &str, key: &str, size: u64) -> String {
    uuid::Uuid::new_v5(&NAMESPACE, format!("s3://{bucket}/{key}#{size}").as_bytes()).to_string()
}

/// Admits every object under `prefix` in `bucket` (on the platform's S3 endpoint), each queued
/// for `stages` (those reading `media.uploaded`: `Topology::upload_stages`); with `batch`, as the
/// items of a new batch.
pub async fn backfill(
    store: &ObjectStore,
    bucket: &str,
    prefix: &str,
    db: &Db,
    bus: &Bus,
    stages: &[String],
    batch: Option<&IntoBatch>,
) -> Result<Report> {
    let source = store.in_bucket(bucket);
    let publisher = bus.publisher("/mediaflow/backfill")?;
    let mut report = Report::default();
    let mut admitted = Vec::new();
    let objects = source
        .list(prefix)
        .await
        .with_context(|| format!("listing s3://{bucket}/{prefix}"))?;
    for (key, size) in objects {
        if size == 0 {
            report.skipped.push((key, "empty object".into()));
            continue;
        }
        let id = media_id(bucket, &key, size);
        if db.media(&id).await?.is_some() {
            report.already += 1;
            continue;
        }
        // One streamed pass: the first bytes decide the format, all of them the checksum.
        let mut stream = source.get_stream(&key).await?.body;
        let mut head = Vec::with_capacity(mediaflow_gateway::SNIFF_LEN);
        let mut hasher = Sha256::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.with_context(|| format!("reading s3://{bucket}/{key}"))?;
            if head.len() < mediaflow_gateway::SNIFF_LEN {
                let take = (mediaflow_gateway::SNIFF_LEN - head.len()).min(chunk.len());
                head.extend_from_slice(&chunk[..take]);
            }
            hasher.update(&chunk);
        }
        let Some(format) = mediaflow_gateway::sniff(&head).filter(|f| f.supported) else {
            report
                .skipped
                .push((key, "not a supported image or video".into()));
            continue;
        };
        let object = ObjectRef {
            bucket: bucket.to_owned(),
            key: key.clone(),
            size,
            sha256: hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            content_type: format.content_type.to_owned(),
        };
        let filename = key
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty())
            .map(str::to_owned);
        admitted.push((id, format.kind, object, filename));
    }
    // A batch knows its count before its first item is announced.
    let batches = mediaflow_batches::Batches::new(db.clone());
    let batch_id = match batch {
        Some(b) if !admitted.is_empty() => {
            let spec = mediaflow_batches::BatchRequest {
                name: b.name.clone(),
                expected_items: Some(admitted.len() as u64),
                manifest: None,
                failure_policy: b.failure_policy,
                timeout_secs: None,
            }
            .validate()?;
            let id = uuid::Uuid::now_v7().to_string();
            batches.create(&id, &spec, Db::now_ms()).await?;
            Some(id)
        }
        _ => None,
    };
    let intake = Intake {
        bus,
        publisher: &publisher,
        stages,
    };
    for (id, kind, object, filename) in admitted {
        let item = match &batch_id {
            Some(batch_id) => {
                let item = batches
                    .take(batch_id, None, &id, Db::now_ms())
                    .await?
                    .map_err(|refused| anyhow::anyhow!("batch {batch_id}: {refused:?}"))?;
                Some(BatchItem {
                    batch_id: batch_id.clone(),
                    item,
                })
            }
            None => None,
        };
        record_and_announce(db, &intake, &id, kind, object, filename, item).await?;
        report.enqueued += 1;
    }
    report.batch = batch_id;
    Ok(report)
}

/// Splits `s3://bucket/prefix` into its parts.
pub fn parse_location(location: &str) -> Result<(String, String)> {
    let rest = location
        .strip_prefix("s3://")
        .with_context(|| format!("`{location}` is not an s3://bucket/prefix location"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    anyhow::ensure!(!bucket.is_empty(), "`{location}` names no bucket");
    Ok((bucket.to_owned(), prefix.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_and_ids() {
        assert_eq!(
            parse_location("s3://old/photos/2019").unwrap(),
            ("old".into(), "photos/2019".into())
        );
        assert_eq!(
            parse_location("s3://old").unwrap(),
            ("old".into(), String::new())
        );
        assert!(parse_location("old/photos").is_err());
        assert_eq!(media_id("b", "k", 1), media_id("b", "k", 1));
        assert_ne!(media_id("b", "k", 1), media_id("b", "k", 2));
    }
}
