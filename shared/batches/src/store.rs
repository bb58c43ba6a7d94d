//! The queries of `batches` and `batch_items`.

use std::collections::BTreeMap;

use mediaflow_db::{Db, DbError};
use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::spec::BatchSpec;

/// Why a batch query failed.
#[derive(Debug, thiserror::Error)]
pub enum BatchesError {
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for BatchesError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(e.into())
    }
}

/// A batch as stored.
#[derive(Clone, Debug, Serialize)]
pub struct BatchRow {
    pub id: String,
    pub name: String,
    pub expected_items: i64,
    /// Whether items are the manifest's names.
    pub manifest: bool,
    /// Items taken by uploads so far.
    pub uploaded: i64,
    pub failure_policy: String,
    pub timeout_secs: Option<i64>,
    /// `open`, then `complete`, `partial` or `failed`.
    pub state: String,
    pub report: Option<serde_json::Value>,
    pub created_at_ms: i64,
    pub completed_at_ms: Option<i64>,
}

/// What an upload's attempt to take an item found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// (`check`) An item is free for the upload; `take` answers with the item instead.
    Taken,
    UnknownBatch,
    /// The batch no longer takes uploads.
    Closed,
    /// A count batch with all its items taken.
    Full,
    /// A manifest batch, and the upload named no file.
    NameNeeded,
    /// A manifest batch without that name.
    NotInManifest,
    /// Another upload took that name.
    AlreadyTaken,
}

/// How far a batch is: its items by media status, and each stage's items by state.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Progress {
    /// Media status (`queued`, `done`, `failed`) to how many of the batch's items have it.
    pub items: BTreeMap<String, i64>,
    pub stages: Vec<StageProgress>,
}

/// One stage's items of a batch by state (`queued`, `running`, `done`, `failed`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct StageProgress {
    pub stage: String,
    pub items: BTreeMap<String, i64>,
}

/// The batch tables.
#[derive(Clone, Debug)]
pub struct Batches {
    db: Db,
}

const COLUMNS: &str = "id, name, expected_items, manifest, uploaded, failure_policy, \
     timeout_secs, state, report, created_at_ms, completed_at_ms";

fn batch_row(r: &AnyRow) -> Result<BatchRow, BatchesError> {
    let report: Option<String> = r.try_get("report")?;
    Ok(BatchRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        expected_items: r.try_get("expected_items")?,
        manifest: r.try_get::<i64, _>("manifest")? != 0,
        uploaded: r.try_get("uploaded")?,
        failure_policy: r.try_get("failure_policy")?,
        timeout_secs: r.try_get("timeout_secs")?,
        state: r.try_get("state")?,
        report: report
            .map(|t| serde_json::from_str(&t))
            .transpose()
            .map_err(|e| DbError::Corrupt(format!("batch report: {e}")))?,
        created_at_ms: r.try_get("created_at_ms")?,
        completed_at_ms: r.try_get("completed_at_ms")?,
    })
}

impl Batches {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    fn pool(&self) -> &sqlx::AnyPool {
        self.db.pool()
    }

    /// Records batch `id` as `spec` says, its manifest's items waiting for uploads.
    pub async fn create(
        &self,
        id: &str,
        spec: &BatchSpec,
        now_ms: i64,
    ) -> Result<BatchRow, BatchesError> {
        let policy = serde_json::to_value(spec.failure_policy)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let mut tx = self.pool().begin().await?;
        sqlx::query(
            "INSERT INTO batches (id, name, expected_items, manifest, uploaded, failure_policy, \
             timeout_secs, state, created_at_ms) VALUES ($1, $2, $3, $4, 0, $5, $6, 'open', $7)",
        )
        .bind(id)
        .bind(&spec.name)
        .bind(i64::try_from(spec.expected_items).unwrap_or(i64::MAX))
        .bind(i64::from(!spec.manifest.is_empty()))
        .bind(policy)
        .bind(
            spec.timeout_secs
                .map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
        )
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        for name in &spec.manifest {
            sqlx::query("INSERT INTO batch_items (batch_id, name) VALUES ($1, $2)")
                .bind(id)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.batch(id)
            .await?
            .ok_or_else(|| DbError::Corrupt(format!("batch {id} vanished")).into())
    }

    pub async fn batch(&self, id: &str) -> Result<Option<BatchRow>, BatchesError> {
        sqlx::query(&format!("SELECT {COLUMNS} FROM batches WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.pool())
            .await?
            .as_ref()
            .map(batch_row)
            .transpose()
    }

    /// Whether an upload named `name` could take an item of batch `id` now (read only: checked
    /// before the upload is received, so a doomed one is refused before its bytes).
    pub async fn check(&self, id: &str, name: Option<&str>) -> Result<Take, BatchesError> {
        let Some(batch) = self.batch(id).await? else {
            return Ok(Take::UnknownBatch);
        };
        if batch.state != "open" {
            return Ok(Take::Closed);
        }
        if !batch.manifest {
            return Ok(if batch.uploaded < batch.expected_items {
                Take::Taken
            } else {
                Take::Full
            });
        }
        let Some(name) = name else {
            return Ok(Take::NameNeeded);
        };
        let item =
            sqlx::query("SELECT media_id FROM batch_items WHERE batch_id = $1 AND name = $2")
                .bind(id)
                .bind(name)
                .fetch_optional(self.pool())
                .await?;
        Ok(match item {
            None => Take::NotInManifest,
            Some(r) if r.try_get::<Option<String>, _>("media_id")?.is_some() => Take::AlreadyTaken,
            Some(_) => Take::Taken,
        })
    }

    /// Gives upload `media_id` an item of batch `id`: the manifest's `name`, or (a count batch)
    /// a new item named by the media id. One conditional statement decides, so concurrent
    /// uploads cannot overfill a batch or take one name twice. The item's name when taken
    /// (`Ok`), else why not.
    pub async fn take(
        &self,
        id: &str,
        name: Option<&str>,
        media_id: &str,
        now_ms: i64,
    ) -> Result<Result<String, Take>, BatchesError> {
        // Whether the batch has a manifest never changes: read it first, so that each
        // transaction below starts with its write (SQLite cannot upgrade a reader that others
        // wrote past).
        let Some(batch) = self.batch(id).await? else {
            return Ok(Err(Take::UnknownBatch));
        };
        if batch.state != "open" {
            return Ok(Err(Take::Closed));
        }
        let mut tx = self.pool().begin().await?;
        let taken = if batch.manifest {
            let Some(name) = name else {
                return Ok(Err(Take::NameNeeded));
            };
            let took = sqlx::query(
                "UPDATE batch_items SET media_id = $3, added_at_ms = $4 \
                 WHERE batch_id = $1 AND name = $2 AND media_id IS NULL",
            )
            .bind(id)
            .bind(name)
            .bind(media_id)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if took {
                sqlx::query("UPDATE batches SET uploaded = uploaded + 1 WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                Ok(name.to_owned())
            } else {
                let listed = sqlx::query(
                    "SELECT 1 AS one FROM batch_items WHERE batch_id = $1 AND name = $2",
                )
                .bind(id)
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
                Err(if listed {
                    Take::AlreadyTaken
                } else {
                    Take::NotInManifest
                })
            }
        } else {
            let room = sqlx::query(
                "UPDATE batches SET uploaded = uploaded + 1 \
                 WHERE id = $1 AND state = 'open' AND uploaded < expected_items",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if room {
                sqlx::query(
                    "INSERT INTO batch_items (batch_id, name, media_id, added_at_ms) \
                     VALUES ($1, $2, $2, $3)",
                )
                .bind(id)
                .bind(media_id)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
                Ok(media_id.to_owned())
            } else {
                Err(Take::Full)
            }
        };
        if taken.is_ok() {
            tx.commit().await?;
        }
        Ok(taken)
    }

    /// Gives back the item upload `media_id` took in batch `id` (its upload failed before it
    /// was announced).
    pub async fn give_back(&self, id: &str, media_id: &str) -> Result<(), BatchesError> {
        let mut tx = self.pool().begin().await?;
        // A manifest's item waits again; a count batch's item goes.
        let freed = sqlx::query(
            "UPDATE batch_items SET media_id = NULL, added_at_ms = NULL \
             WHERE batch_id = $1 AND media_id = $2 AND name <> media_id",
        )
        .bind(id)
        .bind(media_id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            + sqlx::query("DELETE FROM batch_items WHERE batch_id = $1 AND media_id = $2")
                .bind(id)
                .bind(media_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if freed > 0 {
            sqlx::query("UPDATE batches SET uploaded = uploaded - 1 WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every reducer's report of batch `id`, by reduce stage.
    pub async fn reports(
        &self,
        id: &str,
    ) -> Result<BTreeMap<String, serde_json::Value>, BatchesError> {
        let rows = sqlx::query("SELECT stage, report FROM reports WHERE batch_id = $1")
            .bind(id)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| -> Result<(String, serde_json::Value), BatchesError> {
                let text: String = r.try_get("report")?;
                let report = serde_json::from_str(&text)
                    .map_err(|e| DbError::Corrupt(format!("report: {e}")))?;
                Ok((r.try_get("stage")?, report))
            })
            .collect()
    }

    /// Batch `id`'s items by media status, and each stage's items by state.
    pub async fn progress(&self, id: &str) -> Result<Progress, BatchesError> {
        let mut progress = Progress::default();
        let items = sqlx::query(
            "SELECT m.status AS status, COUNT(*) AS n FROM batch_items b \
             JOIN media m ON m.id = b.media_id WHERE b.batch_id = $1 GROUP BY m.status",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await?;
        for r in &items {
            progress
                .items
                .insert(r.try_get("status")?, r.try_get::<i64, _>("n")?);
        }
        let stages = sqlx::query(
            "SELECT s.stage AS stage, s.state AS state, COUNT(*) AS n FROM batch_items b \
             JOIN stage_status s ON s.entity_id = b.media_id WHERE b.batch_id = $1 \
             GROUP BY s.stage, s.state ORDER BY s.stage",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await?;
        for r in &stages {
            let stage: String = r.try_get("stage")?;
            if progress.stages.last().is_none_or(|s| s.stage != stage) {
                progress.stages.push(StageProgress {
                    stage: stage.clone(),
                    items: BTreeMap::new(),
                });
            }
            if let Some(s) = progress.stages.last_mut() {
                s.items
                    .insert(r.try_get("state")?, r.try_get::<i64, _>("n")?);
            }
        }
        Ok(progress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BatchRequest;

    async fn batches() -> (tempfile::TempDir, Batches) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("b.db").display());
        let db = Db::connect(&url, 8).await.unwrap();
        (dir, Batches::new(db))
    }

    fn spec(v: serde_json::Value) -> BatchSpec {
        serde_json::from_value::<BatchRequest>(v)
            .unwrap()
            .validate()
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_uploads_never_overfill_a_batch_or_take_a_name_twice() {
        let (_dir, b) = batches().await;
        b.create(
            "c",
            &spec(serde_json::json!({"name": "c", "expected_items": 3})),
            1,
        )
        .await
        .unwrap();
        let takes = (0..10).map(|n| {
            let b = b.clone();
            tokio::spawn(async move {
                b.take("c", Some("ignored"), &format!("m{n}"), 2)
                    .await
                    .unwrap()
            })
        });
        let mut taken = 0;
        for t in takes {
            match t.await.unwrap() {
                // A count batch's item is named by the media id, whatever the file's name.
                Ok(item) if item.starts_with('m') => taken += 1,
                Err(Take::Full) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(taken, 3);
        assert_eq!(b.check("c", None).await.unwrap(), Take::Full);
        let taken_by: Vec<String> =
            sqlx::query("SELECT media_id FROM batch_items WHERE batch_id = 'c'")
                .fetch_all(b.pool())
                .await
                .unwrap()
                .iter()
                .map(|r| r.try_get("media_id").unwrap())
                .collect();
        b.give_back("c", &taken_by[0]).await.unwrap();
        assert_eq!(b.batch("c").await.unwrap().unwrap().uploaded, 2);
        assert_eq!(b.check("c", None).await.unwrap(), Take::Taken);

        let m = spec(serde_json::json!({"name": "m", "manifest": ["a.jpg", "b.jpg"]}));
        b.create("m", &m, 1).await.unwrap();
        assert_eq!(b.check("m", None).await.unwrap(), Take::NameNeeded);
        assert_eq!(
            b.check("m", Some("z.jpg")).await.unwrap(),
            Take::NotInManifest
        );
        let racers = (0..6).map(|n| {
            let b = b.clone();
            tokio::spawn(async move {
                b.take("m", Some("a.jpg"), &format!("x{n}"), 3)
                    .await
                    .unwrap()
            })
        });
        let mut results = Vec::new();
        for r in racers {
            results.push(r.await.unwrap());
        }
        let won: Vec<_> = results.iter().filter_map(|t| t.as_ref().ok()).collect();
        assert_eq!(won, ["a.jpg"], "{results:?}");
        assert!(
            results
                .iter()
                .all(|t| matches!(t, Ok(_) | Err(Take::AlreadyTaken)))
        );
        assert_eq!(
            b.take("m", Some("z.jpg"), "y", 4).await.unwrap(),
            Err(Take::NotInManifest)
        );
        assert_eq!(
            b.take("nope", None, "y", 4).await.unwrap(),
            Err(Take::UnknownBatch)
        );
        let row = b.batch("m").await.unwrap().unwrap();
        assert_eq!(
            (row.uploaded, row.expected_items, row.manifest),
            (1, 2, true)
        );
        assert_eq!(row.failure_policy, "fail-batch");
    }
}
