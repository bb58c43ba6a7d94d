//! The `join` stage kind (ch. 12's barrier), keyed by media or by batch.
//!
//! - `by: media` waits, for each media, for every declared branch: a branch arrives as the event
//!   of its declared type about the media (its subject), or fails as a dead letter of its
//!   declared stage about the media. When all arrived (or the policy or the deadline ends it) the
//!   join emits one `mediaflow.media.completed` with every branch's result, and, if asked,
//!   deletes the original upload once every branch succeeded.
//! - `by: batch` waits, for each batch, for every item of its manifest (or its count): an item
//!   arrives as its `mediaflow.media.completed`, done if the media completed, failed otherwise.
//!   The batch's own failure policy and timeout apply. It emits one
//!   `mediaflow.batch.completed` and records the batch's outcome.
//!
//! A key's barrier lives in `join_state`. Each input changes it in one transaction that locks the
//! key's row; the release and its emission commit in the same transaction. Arrivals are
//! idempotent, so an input delivered again (after a crash, or produced twice) changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cloudevents::{AttributesReader, Event};
use mediaflow_coordination::{Arrival, Barrier, Expected, FailurePolicy, Outcome, Step};
use mediaflow_db::Db;
use mediaflow_events::{
    BatchCompleted, BatchItem, DeadLetter, EventData, JoinOutcome, MediaCompleted, data_json,
};
use mediaflow_runtime::{Handler, Output, StageError};
use mediaflow_store::ObjectStore;
use mediaflow_telemetry::Metrics;
use serde::Deserialize;
use serde_json::Value;
use sqlx::{AnyConnection, Row};

use crate::ledger::{Emission, Relay};
use crate::{db_error, now_rfc3339};

/// How often a join looks for keys whose deadline passed.
pub const TICK: Duration = Duration::from_secs(1);

/// What a join's key is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinBy {
    Media,
    Batch,
}

/// One branch of a media join.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Branch {
    /// The type of the event the branch produces (`mediaflow.image.processed`).
    #[serde(rename = "type")]
    pub event_type: String,
    /// The stages whose dead letters about a media fail this branch for it (the branch's
    /// workers: every shard of a sharded stage).
    #[serde(default)]
    pub stages: Vec<String>,
}

/// A join stage's settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinConfig {
    pub by: JoinBy,
    /// `by: media`: branch name -> the event it arrives as.
    #[serde(default)]
    pub branches: BTreeMap<String, Branch>,
    /// `by: media`: `fail-batch` (the first failed branch fails the media) or `complete-partial`
    /// (wait for every branch, then complete listing the failures). A batch has its own.
    #[serde(default)]
    pub on_failure: FailurePolicy,
    /// `by: media`: seconds from a media's first arrival after which missing branches count as
    /// timed out. A batch has its own (`timeout_secs` of `POST /v1/batches`).
    pub timeout_secs: Option<u64>,
    /// `by: media`: delete the original upload (the `input` object the branches name) once
    /// every branch succeeded, before the release commits.
    #[serde(default)]
    pub delete_originals: bool,
}

impl JoinConfig {
    /// Problems with the settings, as a message.
    pub fn check(&self) -> Result<(), String> {
        match self.by {
            JoinBy::Media => {
                if self.branches.is_empty() {
                    return Err("a media join needs at least one branch under `branches`".into());
                }
                let mut types = BTreeSet::new();
                for (name, b) in &self.branches {
                    if !types.insert(b.event_type.as_str()) {
                        return Err(format!(
                            "branches `{name}` and another arrive as the same type `{}`",
                            b.event_type
                        ));
                    }
                }
                if self.timeout_secs == Some(0) {
                    return Err("`timeout_secs` must be at least 1".into());
                }
                Ok(())
            }
            JoinBy::Batch => {
                if !self.branches.is_empty()
                    || self.timeout_secs.is_some()
                    || self.delete_originals
                    || self.on_failure != FailurePolicy::default()
                {
                    return Err("a batch join takes no `branches`, `timeout_secs`, `on_failure` or `delete_originals`: each batch declares its own policy and timeout".into());
                }
                Ok(())
            }
        }
    }
}

/// A join stage.
#[derive(Clone)]
pub struct Join {
    stage: String,
    config: JoinConfig,
    /// The topic of port `out`.
    out: String,
    source: String,
    db: Db,
    store: ObjectStore,
    metrics: Metrics,
    relay: Relay,
}

/// One arrival for one key.
struct Arrive {
    key: String,
    name: String,
    arrival: Arrival,
}

impl Join {
    pub fn new(
        stage: &str,
        config: JoinConfig,
        out: &str,
        db: Db,
        store: ObjectStore,
        metrics: Metrics,
        relay: Relay,
    ) -> Self {
        Self {
            stage: stage.to_owned(),
            config,
            out: out.to_owned(),
            source: format!("/mediaflow/{stage}"),
            db,
            store,
            metrics,
            relay,
        }
    }

    /// What `event` means to this join: an arrival for a key, or nothing (an event of another
    /// type, a dead letter of another stage).
    fn arrival(&self, event: &Event) -> Result<Option<Arrive>, StageError> {
        let bad = |e: mediaflow_events::EventError| StageError::bad_input(e.to_string());
        match self.config.by {
            JoinBy::Media if event.ty() == DeadLetter::TYPE => {
                let letter: DeadLetter = mediaflow_events::decode(event).map_err(bad)?;
                let Some((name, _)) = self
                    .config
                    .branches
                    .iter()
                    .find(|(_, b)| b.stages.contains(&letter.stage))
                else {
                    return Ok(None);
                };
                let Some(key) = letter
                    .event
                    .as_ref()
                    .and_then(|e| e.get("subject"))
                    .and_then(Value::as_str)
                else {
                    return Ok(None);
                };
                Ok(Some(Arrive {
                    key: key.to_owned(),
                    name: name.clone(),
                    arrival: Arrival::Failed(format!(
                        "{} ({}): {}",
                        letter.stage, letter.error_class, letter.error
                    )),
                }))
            }
            JoinBy::Media => {
                let Some((name, _)) = self
                    .config
                    .branches
                    .iter()
                    .find(|(_, b)| b.event_type == event.ty())
                else {
                    return Ok(None);
                };
                let key = event.subject().ok_or_else(|| {
                    StageError::bad_input(format!(
                        "a `{}` event without a subject (the media id)",
                        event.ty()
                    ))
                })?;
                Ok(Some(Arrive {
                    key: key.to_owned(),
                    name: name.clone(),
                    arrival: Arrival::Done(data_json(event).map_err(bad)?),
                }))
            }
            JoinBy::Batch if event.ty() == MediaCompleted::TYPE => {
                let media: MediaCompleted = mediaflow_events::decode(event).map_err(bad)?;
                let Some(BatchItem { batch_id, item }) = media.batch else {
                    return Ok(None);
                };
                let arrival = match media.outcome {
                    JoinOutcome::Complete => Arrival::Done(Value::String(media.media_id)),
                    _ => Arrival::Failed(
                        media
                            .failures
                            .iter()
                            .map(|(branch, why)| format!("{branch}: {why}"))
                            .collect::<Vec<_>>()
                            .join("; "),
                    ),
                };
                Ok(Some(Arrive {
                    key: batch_id,
                    name: item,
                    arrival,
                }))
            }
            JoinBy::Batch => Ok(None),
        }
    }

    /// A new barrier for `key`, with its deadline.
    async fn fresh(&self, key: &str, now_ms: i64) -> Result<(Barrier, Option<i64>), StageError> {
        match self.config.by {
            JoinBy::Media => {
                let names = self.config.branches.keys().cloned().collect();
                let deadline = self.config.timeout_secs.map(|s| now_ms + (s as i64) * 1000);
                Ok((
                    Barrier::new(Expected::Names(names), self.config.on_failure, deadline),
                    deadline,
                ))
            }
            JoinBy::Batch => {
                let row = sqlx::query(
                    "SELECT expected_items, manifest, failure_policy, timeout_secs, created_at_ms \
                     FROM batches WHERE id = $1",
                )
                .bind(key)
                .fetch_optional(self.db.pool())
                .await
                .map_err(db_error)?
                .ok_or_else(|| StageError::permanent(format!("batch {key} does not exist")))?;
                let get = |e: sqlx::Error| db_error(e);
                let expected_items: i64 = row.try_get("expected_items").map_err(get)?;
                let manifest: i64 = row.try_get("manifest").map_err(get)?;
                let policy: String = row.try_get("failure_policy").map_err(get)?;
                let timeout: Option<i64> = row.try_get("timeout_secs").map_err(get)?;
                let created: i64 = row.try_get("created_at_ms").map_err(get)?;
                let policy: FailurePolicy = serde_json::from_value(Value::String(policy.clone()))
                    .map_err(|_| {
                    StageError::permanent(format!(
                        "batch {key} has an unknown failure policy `{policy}`"
                    ))
                })?;
                let expected = if manifest != 0 {
                    let names: BTreeSet<String> =
                        sqlx::query_scalar("SELECT name FROM batch_items WHERE batch_id = $1")
                            .bind(key)
                            .fetch_all(self.db.pool())
                            .await
                            .map_err(db_error)?
                            .into_iter()
                            .collect();
                    Expected::Names(names)
                } else {
                    Expected::Count(expected_items.max(0) as u64)
                };
                let deadline = timeout.map(|s| created + s * 1000);
                Ok((Barrier::new(expected, policy, deadline), deadline))
            }
        }
    }

    /// Applies `arrive` (or, with None, the deadline at `now_ms`) to its key's barrier, and
    /// releases it if that completes it.
    async fn apply(&self, key: &str, arrive: Option<(&str, Arrival)>) -> Result<(), StageError> {
        let now = Db::now_ms();
        let released: Option<i64> = sqlx::query_scalar(
            "SELECT released FROM join_state WHERE stage = $1 AND join_key = $2",
        )
        .bind(&self.stage)
        .bind(key)
        .fetch_optional(self.db.pool())
        .await
        .map_err(db_error)?;
        if released == Some(1) {
            // Released before: a repeat or a straggler changes nothing.
            return Ok(());
        }
        let fresh = match released {
            Some(_) => None,
            None => Some(self.fresh(key, now).await?),
        };
        let mut tx = self.db.pool().begin().await.map_err(db_error)?;
        if let Some((barrier, deadline)) = fresh {
            let barrier = serde_json::to_string(&barrier)
                .map_err(|e| StageError::permanent(e.to_string()))?;
            sqlx::query(
                "INSERT INTO join_state (stage, join_key, barrier, deadline_ms, released, \
                 updated_at_ms) VALUES ($1, $2, $3, $4, 0, $5) \
                 ON CONFLICT (stage, join_key) DO NOTHING",
            )
            .bind(&self.stage)
            .bind(key)
            .bind(barrier)
            .bind(deadline)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        }
        // Touching the row locks it (PostgreSQL) or the database (SQLite) until the commit:
        // two instances never change one key's barrier at once.
        sqlx::query("UPDATE join_state SET updated_at_ms = $3 WHERE stage = $1 AND join_key = $2")
            .bind(&self.stage)
            .bind(key)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        let row = sqlx::query(
            "SELECT barrier, released FROM join_state WHERE stage = $1 AND join_key = $2",
        )
        .bind(&self.stage)
        .bind(key)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        let released: i64 = row.try_get("released").map_err(db_error)?;
        if released != 0 {
            return Ok(());
        }
        let text: String = row.try_get("barrier").map_err(db_error)?;
        let mut barrier: Barrier = serde_json::from_str(&text)
            .map_err(|e| StageError::permanent(format!("join state of {key}: {e}")))?;
        let outcome = match arrive {
            Some((name, arrival)) => match barrier
                .arrive(name, arrival)
                .map_err(|e| StageError::bad_input(format!("{key}: {e}")))?
            {
                Step::Released(outcome) => Some(outcome),
                Step::Waiting | Step::Late => None,
            },
            None => barrier.expire(now),
        };
        let text =
            serde_json::to_string(&barrier).map_err(|e| StageError::permanent(e.to_string()))?;
        sqlx::query(
            "UPDATE join_state SET barrier = $3, released = $4 WHERE stage = $1 AND join_key = $2",
        )
        .bind(&self.stage)
        .bind(key)
        .bind(text)
        .bind(i64::from(outcome.is_some()))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if let Some(outcome) = &outcome {
            self.release(&mut tx, key, outcome, now).await?;
        }
        tx.commit().await.map_err(db_error)?;
        if let Some(outcome) = outcome {
            self.metrics.coordinated(&self.stage, "released");
            tracing::info!(stage = %self.stage, key, outcome = outcome_of(&outcome).as_str(), "join released");
            // Published (and its readers queued) before this input is done, in the common
            // case: otherwise the items it is about read done until the relay gets to it. A
            // failure here is the relay's to retry.
            if let Err(e) = self.relay.pass().await {
                tracing::warn!(stage = %self.stage, key, error = %e, "the release waits for the relay");
            }
            self.relay.wake();
        }
        Ok(())
    }

    /// Records what releasing `key` with `outcome` emits (and its other effects) in `conn`'s
    /// transaction.
    async fn release(
        &self,
        conn: &mut AnyConnection,
        key: &str,
        outcome: &Outcome,
        now: i64,
    ) -> Result<(), StageError> {
        let (results, failures) = parts(outcome);
        let kind = outcome_of(outcome);
        let emission = match self.config.by {
            JoinBy::Media => {
                let batch =
                    sqlx::query("SELECT batch_id, name FROM batch_items WHERE media_id = $1")
                        .bind(key)
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(db_error)?
                        .map(|r| {
                            Ok::<_, sqlx::Error>(BatchItem {
                                batch_id: r.try_get("batch_id")?,
                                item: r.try_get("name")?,
                            })
                        })
                        .transpose()
                        .map_err(db_error)?;
                if self.config.delete_originals && kind == JoinOutcome::Complete {
                    self.delete_originals(&results).await?;
                }
                let data = MediaCompleted {
                    media_id: key.to_owned(),
                    stage: self.stage.clone(),
                    batch,
                    outcome: kind,
                    branches: results,
                    failures,
                    completed_at: now_rfc3339(),
                };
                Emission::of(&self.out, &self.source, &data)?
            }
            JoinBy::Batch => {
                let items = results
                    .into_iter()
                    .map(|(item, media)| (item, media.as_str().unwrap_or_default().to_owned()))
                    .collect();
                let data = BatchCompleted {
                    batch_id: key.to_owned(),
                    stage: self.stage.clone(),
                    outcome: kind,
                    items,
                    failures,
                    completed_at: now_rfc3339(),
                };
                sqlx::query("UPDATE batches SET state = $2, completed_at_ms = $3 WHERE id = $1")
                    .bind(key)
                    .bind(kind.as_str())
                    .bind(now)
                    .execute(&mut *conn)
                    .await
                    .map_err(db_error)?;
                Emission::of(&self.out, &self.source, &data)?
            }
        };
        emission
            .record(conn, &self.stage, now)
            .await
            .map_err(db_error)
    }

    /// Deletes the upload the branches name as their `input`, once; only an upload the gateway
    /// stored (`uploads/` in the platform's bucket), never an object a backfill read in place.
    async fn delete_originals(&self, results: &BTreeMap<String, Value>) -> Result<(), StageError> {
        let originals: BTreeSet<String> = results
            .values()
            .filter_map(|r| {
                let input = r.get("input")?;
                let bucket = input.get("bucket")?.as_str()?;
                let key = input.get("key")?.as_str()?;
                (bucket == self.store.bucket() && is_upload(key)).then(|| key.to_owned())
            })
            .collect();
        for key in originals {
            self.store
                .delete(&key)
                .await
                .map_err(|e| StageError::dependency(e.is_transient(), e.to_string()))?;
        }
        Ok(())
    }

    /// Releases every key whose deadline passed; run beside the stage every `TICK`.
    pub async fn expire_due(&self) -> Result<usize, StageError> {
        let now = Db::now_ms();
        let mut keys: Vec<String> = sqlx::query_scalar(
            "SELECT join_key FROM join_state WHERE stage = $1 AND released = 0 \
             AND deadline_ms IS NOT NULL AND deadline_ms <= $2",
        )
        .bind(&self.stage)
        .bind(now)
        .fetch_all(self.db.pool())
        .await
        .map_err(db_error)?;
        if self.config.by == JoinBy::Batch {
            // A batch none of whose items ever arrived has no barrier yet.
            let idle: Vec<String> = sqlx::query_scalar(
                "SELECT id FROM batches b WHERE state = 'open' AND timeout_secs IS NOT NULL \
                 AND created_at_ms + timeout_secs * 1000 <= $2 AND NOT EXISTS \
                 (SELECT 1 FROM join_state j WHERE j.stage = $1 AND j.join_key = b.id)",
            )
            .bind(&self.stage)
            .bind(now)
            .fetch_all(self.db.pool())
            .await
            .map_err(db_error)?;
            keys.extend(idle);
        }
        for key in &keys {
            self.apply(key, None).await?;
        }
        Ok(keys.len())
    }

    /// Runs `expire_due` every `TICK` until dropped.
    pub async fn tick(self) {
        loop {
            tokio::time::sleep(TICK).await;
            if let Err(e) = self.expire_due().await {
                tracing::warn!(stage = %self.stage, error = %e, "expiring joins failed; trying again");
            }
        }
    }
}

/// Whether `key` is where the gateway stores an upload: `uploads/<media id>/original.<ext>`.
fn is_upload(key: &str) -> bool {
    key.strip_prefix("uploads/")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(id, file)| {
            !id.is_empty()
                && !id.contains("..")
                && file.starts_with("original.")
                && !file.contains('/')
        })
}

fn parts(outcome: &Outcome) -> (BTreeMap<String, Value>, BTreeMap<String, String>) {
    match outcome.clone() {
        Outcome::Complete { results } => (results, BTreeMap::new()),
        Outcome::Partial { results, failures } | Outcome::Failed { results, failures } => {
            (results, failures)
        }
    }
}

fn outcome_of(outcome: &Outcome) -> JoinOutcome {
    match outcome {
        Outcome::Complete { .. } => JoinOutcome::Complete,
        Outcome::Partial { .. } => JoinOutcome::Partial,
        Outcome::Failed { .. } => JoinOutcome::Failed,
    }
}

impl Handler for Join {
    async fn handle(&self, event: &Event) -> Result<Vec<Output>, StageError> {
        if let Some(Arrive { key, name, arrival }) = self.arrival(event)? {
            self.apply(&key, Some((&name, arrival))).await?;
        }
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_gateways_uploads_are_originals_to_delete() {
        assert!(is_upload("uploads/0190c0de/original.jpg"));
        for key in [
            "photos/a.jpg",
            "uploads/original.jpg",
            "uploads/x/y/original.jpg",
            "uploads/../original.jpg",
            "derived/x/tag/v1/thumb.jpg",
            "uploads/x/thumb.jpg",
        ] {
            assert!(!is_upload(key), "{key}");
        }
    }

    #[test]
    fn settings_are_checked() {
        let parse = |v: Value| serde_json::from_value::<JoinConfig>(v).unwrap().check();
        assert!(parse(serde_json::json!({"by": "media"})).is_err());
        assert!(
            parse(serde_json::json!({"by": "media", "branches": {
                "a": {"type": "t"}, "b": {"type": "t"}}}))
            .is_err()
        );
        assert!(parse(serde_json::json!({"by": "batch", "timeout_secs": 3})).is_err());
        parse(
            serde_json::json!({"by": "media", "branches": {"a": {"type": "t", "stages": ["s"]}},
            "on_failure": "complete-partial", "timeout_secs": 60, "delete_originals": true}),
        )
        .unwrap();
        parse(serde_json::json!({"by": "batch"})).unwrap();
    }
}
