//! The emission ledger: what a join or a reducer releases is published exactly once, on a broker
//! without transactions.
//!
//! A stage records an [`Emission`] in the database transaction that decided it (the barrier that
//! released, the group that closed), so the decision and the emission commit together, once. The
//! stage's [`Relay`] publishes recorded emissions in order: it takes a lease on one, chooses its
//! partition (the default partitioner's, from its key), **notes the partition's end offset**,
//! sends it on that partition, and marks it published with the offset the broker acknowledged.
//!
//! A relay that dies between the note and the mark leaves an emission that may or may not be on
//! the topic. Once its lease runs out, the next relay reads that partition from the noted offset
//! to its end: the event is there (by its id: mark it, do not send it again) or it is not (send
//! it). The lease outlasts the publisher's own delivery timeout, so a send still in flight from
//! the dead relay has landed or failed before anyone looks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudevents::{AttributesReader, Event};
use mediaflow_bus::{Bus, BusError, Publisher};
use mediaflow_db::Db;
use mediaflow_events::EventData;
use mediaflow_runtime::{Bound, StageError, Tracker};
use mediaflow_telemetry::Metrics;
use sqlx::{AnyConnection, Row};
use tokio::sync::Notify;

/// How often a relay looks for emissions when nobody woke it.
const POLL: Duration = Duration::from_secs(1);
/// Emissions taken per look.
const BATCH: i64 = 200;

/// An event a coordinated stage releases, bound for one topic.
#[derive(Clone, Debug)]
pub struct Emission {
    pub topic: String,
    pub key: String,
    pub event: Event,
}

impl Emission {
    /// `data` as an event from `source`, keyed by its subject, for `topic`.
    pub fn of<T: EventData>(topic: &str, source: &str, data: &T) -> Result<Self, StageError> {
        let event = mediaflow_events::encode(data, source)
            .map_err(|e| StageError::permanent(format!("encoding {}: {e}", T::TYPE)))?;
        Ok(Self {
            topic: topic.to_owned(),
            key: data.subject(),
            event,
        })
    }

    /// Records this emission for `stage` in `conn`'s transaction. Recording the same event (by
    /// id) again changes nothing: a decision taken twice emits once.
    pub async fn record(
        &self,
        conn: &mut AnyConnection,
        stage: &str,
        now_ms: i64,
    ) -> Result<(), sqlx::Error> {
        let event = serde_json::to_string(&self.event)
            .map_err(|e| sqlx::Error::Protocol(format!("encoding an emission: {e}")))?;
        sqlx::query(
            "INSERT INTO emissions (id, stage, topic, msg_key, event, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
        )
        .bind(self.event.id())
        .bind(stage)
        .bind(&self.topic)
        .bind(&self.key)
        .bind(event)
        .bind(now_ms)
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// Why a relay's pass stopped (it tries again).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("broker: {0}")]
    Bus(#[from] BusError),
    #[error("recording stage status: {0}")]
    Track(StageError),
    #[error("emission {id} is unreadable: {why}")]
    Corrupt { id: String, why: String },
}

/// One recorded emission not published yet.
struct Pending {
    id: String,
    topic: String,
    key: String,
    event: String,
    /// The partition and its end offset noted before an earlier send, if one was tried.
    noted: Option<(i32, i64)>,
}

/// Publishes one stage's recorded emissions.
#[derive(Clone)]
pub struct Relay {
    stage: String,
    db: Db,
    bus: Bus,
    publisher: Publisher,
    metrics: Metrics,
    /// How long it holds an emission it is publishing: beyond the publisher's delivery timeout.
    lease: Duration,
    /// Told before each send, so the stages reading the topic are queued for the entity the
    /// event is about before it is published (as the runtime does for outputs).
    tracker: Arc<dyn Tracker>,
    wake: Arc<Notify>,
    /// Each topic's partition count and when it was read: read again after
    /// `PARTITIONS_KEPT`, as librdkafka refreshes its own metadata.
    partitions: Arc<Mutex<HashMap<String, (i32, Instant)>>>,
}

/// How long the relay keeps a topic's partition count (librdkafka's default metadata refresh
/// interval: a producer maps keys by the count it last saw too).
const PARTITIONS_KEPT: Duration = Duration::from_secs(300);

impl Relay {
    pub fn new(
        stage: &str,
        db: Db,
        bus: Bus,
        publisher: Publisher,
        metrics: Metrics,
        lease: Duration,
        tracker: Arc<dyn Tracker>,
    ) -> Self {
        Self {
            stage: stage.to_owned(),
            db,
            bus,
            publisher,
            metrics,
            lease,
            tracker,
            wake: Arc::new(Notify::new()),
            partitions: Arc::default(),
        }
    }

    /// How many partitions `topic` has, as read at most `PARTITIONS_KEPT` ago.
    async fn partition_count(&self, topic: &str) -> Result<i32, BusError> {
        let kept = self
            .partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(topic)
            .filter(|(_, at)| at.elapsed() < PARTITIONS_KEPT)
            .map(|&(n, _)| n);
        if let Some(n) = kept {
            return Ok(n);
        }
        let n = self.bus.partition_count(topic).await?;
        self.partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(topic.to_owned(), (n, Instant::now()));
        Ok(n)
    }

    /// Tells the relay that emissions were recorded (it also looks every second).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Publishes emissions as they are recorded, until dropped.
    pub async fn run(self) {
        let mut failures = 0u32;
        loop {
            match self.pass().await {
                Ok(published) => {
                    failures = 0;
                    if published > 0 {
                        continue;
                    }
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(stage = %self.stage, error = %e, "publishing emissions failed; trying again");
                }
            }
            let idle = if failures == 0 {
                POLL
            } else {
                POLL * failures.min(10)
            };
            let _ = tokio::time::timeout(idle, self.wake.notified()).await;
        }
    }

    /// Publishes what is recorded and free now; how many it published.
    pub async fn pass(&self) -> Result<usize, RelayError> {
        let now = Db::now_ms();
        let rows = sqlx::query(
            "SELECT id, topic, msg_key, event, partition_no, from_offset FROM emissions \
             WHERE stage = $1 AND published_at_ms IS NULL \
             AND (lease_until_ms IS NULL OR lease_until_ms < $2) \
             ORDER BY created_at_ms, id LIMIT $3",
        )
        .bind(&self.stage)
        .bind(now)
        .bind(BATCH)
        .fetch_all(self.db.pool())
        .await?;
        let mut published = 0;
        for row in rows {
            let partition: Option<i64> = row.try_get("partition_no")?;
            let from: Option<i64> = row.try_get("from_offset")?;
            let pending = Pending {
                id: row.try_get("id")?,
                topic: row.try_get("topic")?,
                key: row.try_get("msg_key")?,
                event: row.try_get("event")?,
                noted: partition.zip(from).map(|(p, o)| (p as i32, o)),
            };
            if self.publish(pending).await? {
                published += 1;
            }
        }
        Ok(published)
    }

    /// Publishes one emission unless another relay holds it; whether this relay finished it.
    async fn publish(&self, pending: Pending) -> Result<bool, RelayError> {
        let now = Db::now_ms();
        let claimed = sqlx::query(
            "UPDATE emissions SET lease_until_ms = $3 WHERE id = $1 AND published_at_ms IS NULL \
             AND (lease_until_ms IS NULL OR lease_until_ms < $2)",
        )
        .bind(&pending.id)
        .bind(now)
        .bind(now + self.lease.as_millis() as i64)
        .execute(self.db.pool())
        .await?
        .rows_affected()
            == 1;
        if !claimed {
            return Ok(false);
        }
        let partition = match pending.noted {
            Some((partition, from)) => {
                // An earlier relay noted this and may have sent it before it died.
                if let Some(offset) = self
                    .bus
                    .find_event(&pending.topic, partition, from, &pending.id)
                    .await?
                {
                    self.mark(&pending.id, offset).await?;
                    self.metrics.coordinated(&self.stage, "recovered");
                    tracing::info!(stage = %self.stage, id = %pending.id, topic = %pending.topic, partition, offset,
                        "an emission sent before a crash was found on its topic; not sending it again");
                    return Ok(true);
                }
                partition
            }
            None => {
                let partitions = self.partition_count(&pending.topic).await?;
                Publisher::partition_for(&pending.key, partitions)
            }
        };
        let event: Event =
            serde_json::from_str(&pending.event).map_err(|e| RelayError::Corrupt {
                id: pending.id.clone(),
                why: e.to_string(),
            })?;
        self.tracker
            .queued(&[Bound {
                port: String::new(),
                topic: pending.topic.clone(),
                key: pending.key.clone(),
                event: event.clone(),
            }])
            .await
            .map_err(RelayError::Track)?;
        let from = self.bus.end_offset(&pending.topic, partition).await?;
        sqlx::query("UPDATE emissions SET partition_no = $2, from_offset = $3 WHERE id = $1")
            .bind(&pending.id)
            .bind(i64::from(partition))
            .bind(from)
            .execute(self.db.pool())
            .await?;
        let at = match self
            .publisher
            .publish_to(&pending.topic, partition, &pending.key, event)
            .await
        {
            Ok(at) => at,
            Err(e) => {
                // The producer is done with it (acknowledged or not, it retries no more): the
                // next pass may take it at once, and reads the topic from the noted offset first.
                sqlx::query("UPDATE emissions SET lease_until_ms = NULL WHERE id = $1")
                    .bind(&pending.id)
                    .execute(self.db.pool())
                    .await?;
                return Err(e.into());
            }
        };
        self.mark(&pending.id, at.offset).await?;
        self.metrics.coordinated(&self.stage, "emitted");
        Ok(true)
    }

    async fn mark(&self, id: &str, offset: i64) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE emissions SET published_offset = $2, published_at_ms = $3, \
             lease_until_ms = NULL WHERE id = $1",
        )
        .bind(id)
        .bind(offset)
        .bind(Db::now_ms())
        .execute(self.db.pool())
        .await?;
        Ok(())
    }
}
