//! The database behind the REST API: media items, work items and stage results. One code path for SQLite (one
//! machine) and PostgreSQL (production) through sqlx's `Any` driver; portable SQL only.

use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Row};

/// How mediaflow reaches its database.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DbConfig {
    /// `sqlite://path/to/file.db` or `postgres://user@host/db`. Empty under `mediaflow up`: a
    /// SQLite file in the data folder is used. `DATABASE_URL` overrides it.
    pub url: String,
    /// Maximum pooled connections.
    pub max_connections: u32,
}

impl Default for DbConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            max_connections: 8,
        }
    }
}

/// Why a database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unsupported database URL `{0}`: expected sqlite:// or postgres://")]
    UnsupportedUrl(String),
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored row is invalid: {0}")]
    Corrupt(String),
}

impl DbError {
    /// Whether a retry later can succeed (connection lost, pool exhausted, locked database).
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Sql(e) => {
                matches!(
                    e,
                    sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
                ) || e.as_database_error().is_some_and(|d| {
                    // SQLite BUSY/LOCKED, PostgreSQL serialization failure / deadlock.
                    matches!(d.code().as_deref(), Some("5" | "6" | "40001" | "40P01"))
                })
            }
            _ => false,
        }
    }
}

/// Processing state of a media item or a work item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MediaStatus {
    /// Stored and announced; waiting for its stage.
    Queued,
    /// Every result is in.
    Done,
    /// A stage gave up on it; `error` says why.
    Failed,
}

impl MediaStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MediaStatus::Queued => "queued",
            MediaStatus::Done => "done",
            MediaStatus::Failed => "failed",
        }
    }
}

impl FromStr for MediaStatus {
    type Err = DbError;
    fn from_str(s: &str) -> Result<Self, DbError> {
        match s {
            "queued" => Ok(MediaStatus::Queued),
            "done" => Ok(MediaStatus::Done),
            "failed" => Ok(MediaStatus::Failed),
            other => Err(DbError::Corrupt(format!("unknown media status `{other}`"))),
        }
    }
}

/// One stage's state for one media item or work item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    /// An event about the entity waits on a topic the stage reads.
    Queued,
    /// The stage is handling it.
    Running,
    /// The stage finished with it.
    Done,
    /// The stage gave up on it; `error` says why.
    Failed,
}

impl StageState {
    pub fn as_str(self) -> &'static str {
        match self {
            StageState::Queued => "queued",
            StageState::Running => "running",
            StageState::Done => "done",
            StageState::Failed => "failed",
        }
    }
}

impl FromStr for StageState {
    type Err = DbError;
    fn from_str(s: &str) -> Result<Self, DbError> {
        match s {
            "queued" => Ok(StageState::Queued),
            "running" => Ok(StageState::Running),
            "done" => Ok(StageState::Done),
            "failed" => Ok(StageState::Failed),
            other => Err(DbError::Corrupt(format!("unknown stage state `{other}`"))),
        }
    }
}

/// A stage's state for an entity, as `GET /v1/media/{id}` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StageStatusRow {
    pub stage: String,
    pub state: StageState,
    pub error: Option<String>,
    pub updated_at_ms: i64,
}

/// The entity's status given its stages' states: failed if one failed (with the first failed
/// stage's reason), queued while one is queued or running, done when all are; None without any.
pub fn derive_status(stages: &[StageStatusRow]) -> Option<(MediaStatus, Option<String>)> {
    if stages.is_empty() {
        return None;
    }
    if let Some(failed) = stages.iter().find(|s| s.state == StageState::Failed) {
        let why = failed.error.as_deref().unwrap_or("failed");
        return Some((
            MediaStatus::Failed,
            Some(format!("{}: {why}", failed.stage)),
        ));
    }
    if stages
        .iter()
        .any(|s| matches!(s.state, StageState::Queued | StageState::Running))
    {
        return Some((MediaStatus::Queued, None));
    }
    Some((MediaStatus::Done, None))
}

/// A media item as recorded at upload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MediaRow {
    pub id: String,
    pub kind: String,
    pub content_type: String,
    pub filename: Option<String>,
    pub bucket: String,
    pub object_key: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub status: MediaStatus,
    pub error: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// An event about to be published, and the stages that read its topic.
#[derive(Clone, Copy, Debug)]
pub struct Queued<'a> {
    pub event_id: &'a str,
    pub stages: &'a [String],
}

/// What a stage's results belong to: an upload or a work item from a source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entity<'a> {
    Media(&'a str),
    Item(&'a str),
}

impl Entity<'_> {
    pub fn id(&self) -> &str {
        match self {
            Entity::Media(id) | Entity::Item(id) => id,
        }
    }

    /// The table holding the entity's status.
    fn table(&self) -> &'static str {
        match self {
            Entity::Media(_) => "media",
            Entity::Item(_) => "items",
        }
    }
}

/// The image stage's tags of one image (see migration 0005).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ImageTagsRow {
    pub media_id: String,
    pub stage_version: String,
    pub phash: String,
    pub camera_make: Option<String>,
    pub camera_model: Option<String>,
    pub taken_at: Option<String>,
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
    /// The whole tag set, as JSON.
    pub tags_json: String,
}

/// A work item as a source recorded it when it enqueued it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ItemRow {
    pub id: String,
    pub source: String,
    pub name: String,
    pub status: MediaStatus,
    pub error: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// One output a stage produced for an entity (media item or work item).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResultRow {
    /// The media id or work item id.
    pub entity_id: String,
    pub stage: String,
    pub stage_version: String,
    pub name: String,
    pub bucket: String,
    pub object_key: String,
    pub content_type: String,
    pub size_bytes: i64,
    pub sha256: String,
    /// Pixel size, for image outputs.
    pub width: Option<i64>,
    pub height: Option<i64>,
}

/// Every stage's state for `entity_id`, by stage name.
async fn stage_states_in<'e, E>(db: E, entity_id: &str) -> Result<Vec<StageStatusRow>, DbError>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let rows = sqlx::query(
        "SELECT stage, state, error, updated_at_ms FROM stage_status WHERE entity_id = $1 \
         ORDER BY stage",
    )
    .bind(entity_id)
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(StageStatusRow {
                stage: r.try_get("stage")?,
                state: r.try_get::<String, _>("state")?.parse()?,
                error: r.try_get("error")?,
                updated_at_ms: r.try_get("updated_at_ms")?,
            })
        })
        .collect()
}

/// Writes `entity`'s status as its stages' states say, inside `tx`.
async fn derive_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    entity: Entity<'_>,
    now: i64,
) -> Result<(), DbError> {
    // The entity's row first: it stays locked (PostgreSQL) until the commit, so two stages
    // finishing at once derive one after the other, the second from the first's committed
    // state. Derived from a snapshot each, both could write a status neither state leads to
    // (a media item left `queued` with every stage done). SQLite takes its one write lock.
    let touch = format!(
        "UPDATE {} SET updated_at_ms = updated_at_ms WHERE id = $1",
        entity.table()
    );
    sqlx::query(&touch)
        .bind(entity.id())
        .execute(&mut **tx)
        .await?;
    let stages = stage_states_in(&mut **tx, entity.id()).await?;
    let Some((status, error)) = derive_status(&stages) else {
        return Ok(());
    };
    let update = format!(
        "UPDATE {} SET status = $1, error = $2, updated_at_ms = $3 WHERE id = $4",
        entity.table()
    );
    sqlx::query(&update)
        .bind(status.as_str())
        .bind(error)
        .bind(now)
        .bind(entity.id())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Stores a stage's outputs within `tx` (see `Db::record_results`).
async fn results_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    entity: Entity<'_>,
    results: &[ResultRow],
    now: i64,
) -> Result<(), DbError> {
    for r in results {
        sqlx::query(
            "INSERT INTO results (entity_id, stage, stage_version, name, bucket, object_key, \
             content_type, size_bytes, sha256, width, height, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (entity_id, stage, stage_version, name) DO UPDATE SET \
             bucket = excluded.bucket, object_key = excluded.object_key, \
             content_type = excluded.content_type, size_bytes = excluded.size_bytes, \
             sha256 = excluded.sha256, width = excluded.width, height = excluded.height",
        )
        .bind(entity.id())
        .bind(&r.stage)
        .bind(&r.stage_version)
        .bind(&r.name)
        .bind(&r.bucket)
        .bind(&r.object_key)
        .bind(&r.content_type)
        .bind(r.size_bytes)
        .bind(&r.sha256)
        .bind(r.width)
        .bind(r.height)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Queues `entity` for `stages` within `tx`: event `event_id` about it is on its way to them
/// (its status is for the caller to derive). A stage that was done with the entity is queued
/// again (a join's second branch): until the stage has finished with the event, the entity is
/// not done. A running or failed stage keeps its state; the event stays pending for it
/// (`finish_in`).
async fn queue_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    entity: Entity<'_>,
    event_id: &str,
    stages: &[String],
    now: i64,
) -> Result<(), DbError> {
    for stage in stages {
        sqlx::query(
            "INSERT INTO stage_pending (entity_id, stage, event_id) VALUES ($1, $2, $3) \
             ON CONFLICT (entity_id, stage, event_id) DO NOTHING",
        )
        .bind(entity.id())
        .bind(stage)
        .bind(event_id)
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "INSERT INTO stage_status (entity_id, stage, state, error, updated_at_ms) \
             VALUES ($1, $2, $3, NULL, $4) ON CONFLICT (entity_id, stage) DO UPDATE SET \
             state = excluded.state, updated_at_ms = excluded.updated_at_ms \
             WHERE stage_status.state = 'done'",
        )
        .bind(entity.id())
        .bind(stage)
        .bind(StageState::Queued.as_str())
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// What `stage`'s state for `entity` is after it reached `state` with event `event_id`, within
/// `tx`: a finished event (done or failed) is no longer pending, and a stage done with one
/// event while another is still pending for it is queued.
async fn finish_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    entity: Entity<'_>,
    stage: &str,
    event_id: &str,
    state: StageState,
) -> Result<StageState, DbError> {
    if state == StageState::Running {
        return Ok(state);
    }
    sqlx::query("DELETE FROM stage_pending WHERE entity_id = $1 AND stage = $2 AND event_id = $3")
        .bind(entity.id())
        .bind(stage)
        .bind(event_id)
        .execute(&mut **tx)
        .await?;
    if state != StageState::Done {
        return Ok(state);
    }
    let waiting = sqlx::query("SELECT 1 FROM stage_pending WHERE entity_id = $1 AND stage = $2")
        .bind(entity.id())
        .bind(stage)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(if waiting.is_some() {
        StageState::Queued
    } else {
        StageState::Done
    })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A pool of connections to the mediaflow database.
#[derive(Clone, Debug)]
pub struct Db {
    pool: AnyPool,
}

impl Db {
    /// Connects to `url` and brings the schema up to date.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, DbError> {
        install_default_drivers();
        let url = if let Some(rest) = url.strip_prefix("sqlite://") {
            // Create the file on first use; WAL lets the API read while workers write.
            let sep = if rest.contains('?') { '&' } else { '?' };
            format!("sqlite://{rest}{sep}mode=rwc")
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            url.to_owned()
        } else {
            return Err(DbError::UnsupportedUrl(url.to_owned()));
        };
        let sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite {
                max_connections.min(4)
            } else {
                max_connections
            })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *conn)
                            .await?;
                        // In WAL mode NORMAL syncs at checkpoints, not at every commit: a
                        // commit survives a crash of the process (kill -9 included); a power
                        // cut may lose the last commits, as on any single-machine setup.
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA busy_timeout = 5000")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA foreign_keys = ON")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    /// The connection pool, for crates that own tables of their own (`mediaflow-users`).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Records a new upload queued for `stages` with event `event_id` (its announcement), in
    /// one transaction: the media row and its stages' rows appear together or not at all.
    /// Inserting the same id twice is an error.
    pub async fn insert_media(
        &self,
        m: &MediaRow,
        event_id: &str,
        stages: &[String],
    ) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO media (id, kind, content_type, filename, bucket, object_key, size_bytes, \
             sha256, status, error, created_at_ms, updated_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&m.id)
        .bind(&m.kind)
        .bind(&m.content_type)
        .bind(m.filename.as_deref())
        .bind(&m.bucket)
        .bind(&m.object_key)
        .bind(m.size_bytes)
        .bind(&m.sha256)
        .bind(m.status.as_str())
        .bind(m.error.as_deref())
        .bind(m.created_at_ms)
        .bind(m.updated_at_ms)
        .execute(&mut *tx)
        .await?;
        if !stages.is_empty() {
            let media = Entity::Media(&m.id);
            queue_in(&mut tx, media, event_id, stages, m.updated_at_ms).await?;
            derive_in(&mut tx, media, m.updated_at_ms).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Removes an upload that was never announced (its event could not be published).
    pub async fn delete_media(&self, id: &str) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        for table in ["stage_pending", "stage_status"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE entity_id = $1"))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM media WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn media(&self, id: &str) -> Result<Option<MediaRow>, DbError> {
        let row = sqlx::query(
            "SELECT id, kind, content_type, filename, bucket, object_key, size_bytes, sha256, \
             status, error, created_at_ms, updated_at_ms FROM media WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(MediaRow {
                id: r.try_get("id")?,
                kind: r.try_get("kind")?,
                content_type: r.try_get("content_type")?,
                filename: r.try_get("filename")?,
                bucket: r.try_get("bucket")?,
                object_key: r.try_get("object_key")?,
                size_bytes: r.try_get("size_bytes")?,
                sha256: r.try_get("sha256")?,
                status: r.try_get::<String, _>("status")?.parse()?,
                error: r.try_get("error")?,
                created_at_ms: r.try_get("created_at_ms")?,
                updated_at_ms: r.try_get("updated_at_ms")?,
            })
        })
        .transpose()
    }

    /// Stores a stage's outputs, in one transaction. Idempotent: the same (entity, stage,
    /// version, name) overwrites its row. (Whether the entity is done is for its stages' states
    /// to say: `set_stage_state`.)
    pub async fn record_results(
        &self,
        entity: Entity<'_>,
        results: &[ResultRow],
    ) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        results_in(&mut tx, entity, results, now_ms()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Queues `entity` for `stages`: event `event_id` about it is about to be published on a
    /// topic they read (see `queue_in`: a stage done with it is queued again). Then derives its
    /// status again.
    pub async fn queue_stages(
        &self,
        entity: Entity<'_>,
        event_id: &str,
        stages: &[String],
    ) -> Result<(), DbError> {
        if stages.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        queue_in(&mut tx, entity, event_id, stages, now).await?;
        derive_in(&mut tx, entity, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Sets `stage`'s state for `entity` as it is with event `event_id` (with the reason, when
    /// it failed), then derives the entity's status again. Done with one event while another is
    /// pending for it, the stage is queued (see `finish_in`).
    pub async fn set_stage_state(
        &self,
        entity: Entity<'_>,
        stage: &str,
        event_id: &str,
        state: StageState,
        error: Option<&str>,
    ) -> Result<(), DbError> {
        self.stage_step(entity, stage, event_id, state, error, &[])
            .await
    }

    /// `stage` is done with event `event_id` about `entity` and is about to publish `next`
    /// about it, in one transaction: the stages each of those goes to are queued for it (as
    /// `queue_stages`), then the stage is done with it (as `set_stage_state`), and the entity's
    /// status is derived once.
    pub async fn stage_done(
        &self,
        entity: Entity<'_>,
        stage: &str,
        event_id: &str,
        next: &[Queued<'_>],
    ) -> Result<(), DbError> {
        self.stage_step(entity, stage, event_id, StageState::Done, None, next)
            .await
    }

    async fn stage_step(
        &self,
        entity: Entity<'_>,
        stage: &str,
        event_id: &str,
        state: StageState,
        error: Option<&str>,
        next: &[Queued<'_>],
    ) -> Result<(), DbError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        for q in next {
            queue_in(&mut tx, entity, q.event_id, q.stages, now).await?;
        }
        let state = finish_in(&mut tx, entity, stage, event_id, state).await?;
        sqlx::query(
            "INSERT INTO stage_status (entity_id, stage, state, error, updated_at_ms) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (entity_id, stage) DO UPDATE SET \
             state = excluded.state, error = excluded.error, updated_at_ms = excluded.updated_at_ms",
        )
        .bind(entity.id())
        .bind(stage)
        .bind(state.as_str())
        .bind(error)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        derive_in(&mut tx, entity, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every stage's state for an entity, by stage name.
    pub async fn stage_states(&self, entity_id: &str) -> Result<Vec<StageStatusRow>, DbError> {
        stage_states_in(&self.pool, entity_id).await
    }

    /// Every result recorded for an entity, in a stable order.
    pub async fn results(&self, entity_id: &str) -> Result<Vec<ResultRow>, DbError> {
        let rows = sqlx::query(
            "SELECT entity_id, stage, stage_version, name, bucket, object_key, content_type, \
             size_bytes, sha256, width, height FROM results WHERE entity_id = $1 \
             ORDER BY stage, stage_version, name",
        )
        .bind(entity_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(ResultRow {
                    entity_id: r.try_get("entity_id")?,
                    stage: r.try_get("stage")?,
                    stage_version: r.try_get("stage_version")?,
                    name: r.try_get("name")?,
                    bucket: r.try_get("bucket")?,
                    object_key: r.try_get("object_key")?,
                    content_type: r.try_get("content_type")?,
                    size_bytes: r.try_get("size_bytes")?,
                    sha256: r.try_get("sha256")?,
                    width: r.try_get("width")?,
                    height: r.try_get("height")?,
                })
            })
            .collect()
    }

    /// Stores the image stage's outputs (as `record_results`) and the image's tags in one
    /// transaction; the same (media, stage version) overwrites its tags row.
    pub async fn record_image(
        &self,
        results: &[ResultRow],
        t: &ImageTagsRow,
    ) -> Result<(), DbError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        results_in(&mut tx, Entity::Media(&t.media_id), results, now).await?;
        sqlx::query(
            "INSERT INTO image_tags (media_id, stage_version, phash, camera_make, camera_model, \
             taken_at, latitude, longitude, tags_json, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (media_id, stage_version) DO UPDATE SET phash = excluded.phash, \
             camera_make = excluded.camera_make, camera_model = excluded.camera_model, \
             taken_at = excluded.taken_at, latitude = excluded.latitude, \
             longitude = excluded.longitude, tags_json = excluded.tags_json",
        )
        .bind(&t.media_id)
        .bind(&t.stage_version)
        .bind(&t.phash)
        .bind(t.camera_make.as_deref())
        .bind(t.camera_model.as_deref())
        .bind(t.taken_at.as_deref())
        .bind(t.latitude)
        .bind(t.longitude)
        .bind(&t.tags_json)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The tags the image stage recorded for `media_id`, newest stage version first.
    pub async fn image_tags(&self, media_id: &str) -> Result<Vec<ImageTagsRow>, DbError> {
        let rows = sqlx::query(
            "SELECT media_id, stage_version, phash, camera_make, camera_model, taken_at, \
             latitude, longitude, tags_json FROM image_tags WHERE media_id = $1 \
             ORDER BY stage_version DESC",
        )
        .bind(media_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(ImageTagsRow {
                    media_id: r.try_get("media_id")?,
                    stage_version: r.try_get("stage_version")?,
                    phash: r.try_get("phash")?,
                    camera_make: r.try_get("camera_make")?,
                    camera_model: r.try_get("camera_model")?,
                    taken_at: r.try_get("taken_at")?,
                    latitude: r.try_get("latitude")?,
                    longitude: r.try_get("longitude")?,
                    tags_json: r.try_get("tags_json")?,
                })
            })
            .collect()
    }

    /// Records work item `id` (`name` of `source`) as queued. Returns false if the source had
    /// recorded it before: the item is enqueued once.
    pub async fn insert_item(&self, id: &str, source: &str, name: &str) -> Result<bool, DbError> {
        let now = now_ms();
        let done = sqlx::query(
            "INSERT INTO items (id, source, name, status, error, created_at_ms, updated_at_ms) \
             VALUES ($1, $2, $3, $4, NULL, $5, $5) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(source)
        .bind(name)
        .bind(MediaStatus::Queued.as_str())
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The names of the items `source` has enqueued.
    pub async fn item_names(
        &self,
        source: &str,
    ) -> Result<std::collections::HashSet<String>, DbError> {
        let rows = sqlx::query("SELECT name FROM items WHERE source = $1")
            .bind(source)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(|r| Ok(r.try_get("name")?)).collect()
    }

    pub async fn item(&self, id: &str) -> Result<Option<ItemRow>, DbError> {
        let row = sqlx::query(
            "SELECT id, source, name, status, error, created_at_ms, updated_at_ms \
             FROM items WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(ItemRow {
                id: r.try_get("id")?,
                source: r.try_get("source")?,
                name: r.try_get("name")?,
                status: r.try_get::<String, _>("status")?.parse()?,
                error: r.try_get("error")?,
                created_at_ms: r.try_get("created_at_ms")?,
                updated_at_ms: r.try_get("updated_at_ms")?,
            })
        })
        .transpose()
    }

    /// Ids of the dead letters replayed so far.
    pub async fn replayed_dead_letters(
        &self,
    ) -> Result<std::collections::HashSet<String>, DbError> {
        let rows = sqlx::query("SELECT dead_letter_id FROM dead_letter_replays")
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|r| Ok(r.try_get("dead_letter_id")?))
            .collect()
    }

    /// Records that a dead letter was replayed. Recording it twice is not an error.
    pub async fn record_replay(&self, dead_letter_id: &str, stage: &str) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO dead_letter_replays (dead_letter_id, stage, replayed_at_ms) \
             VALUES ($1, $2, $3) ON CONFLICT (dead_letter_id) DO NOTHING",
        )
        .bind(dead_letter_id)
        .bind(stage)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Number of result rows of `stage`.
    pub async fn result_count(&self, stage: &str) -> Result<i64, DbError> {
        Ok(
            sqlx::query("SELECT COUNT(*) AS n FROM results WHERE stage = $1")
                .bind(stage)
                .fetch_one(&self.pool)
                .await?
                .try_get("n")?,
        )
    }

    /// Number of media rows with `status`.
    pub async fn media_count_with(&self, status: MediaStatus) -> Result<i64, DbError> {
        Ok(
            sqlx::query("SELECT COUNT(*) AS n FROM media WHERE status = $1")
                .bind(status.as_str())
                .fetch_one(&self.pool)
                .await?
                .try_get("n")?,
        )
    }

    /// Number of media rows (for tests and metrics).
    pub async fn media_count(&self) -> Result<i64, DbError> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM media")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }

    /// A new media row stamped now, for the gateway.
    pub fn now_ms() -> i64 {
        now_ms()
    }
}
