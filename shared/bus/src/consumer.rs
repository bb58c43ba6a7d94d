//! At-least-once consumption. Offsets are stored only when the caller acknowledges a delivery
//! (after all of its outputs are acknowledged); librdkafka commits stored offsets periodically,
//! before partitions are revoked, and on close.

use cloudevents::Event;
use cloudevents::binding::rdkafka::MessageExt;
use mediaflow_events::RawMessage;
use std::collections::BTreeMap;
use std::sync::Arc;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::{BusConfig, BusError};

/// Where a consumer group with no committed offset starts reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartFrom {
    Earliest,
    Latest,
}

/// One message taken from a topic.
#[derive(Debug)]
pub struct Delivery {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    /// The decoded CloudEvent, or why the message is not one. A malformed message is still
    /// delivered so that the stage can record it and move past it.
    pub event: Result<Event, String>,
    /// The message as received, kept only when it is not a CloudEvent.
    pub raw: Option<RawMessage>,
}

/// Longest message value kept in a dead letter.
const RAW_KEEP: usize = 64 * 1024;

fn raw_message(msg: &impl Message) -> RawMessage {
    use rdkafka::message::Headers;
    let value = msg.payload().unwrap_or_default();
    let headers = msg
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    let v = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                    (h.key.to_owned(), v.into_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    RawMessage {
        value: String::from_utf8_lossy(&value[..value.len().min(RAW_KEEP)]).into_owned(),
        value_len: value.len() as u64,
        headers,
    }
}

/// Told when partitions are about to leave a consumer's assignment (a rebalance, or leaving the
/// group).
pub trait RevokeListener: Send + Sync + 'static {
    /// `partitions` (topic, partition) are about to be revoked. Called on the task polling the
    /// consumer, which waits meanwhile: the listener may block to let their messages finish and
    /// store their offsets (within the group's rebalance timeout, `max.poll.interval.ms`). Every
    /// stored offset is committed when it returns, before the partitions move.
    fn revoking(&self, partitions: &[(String, i32)]);
}

/// Hands revocations to the listener, then commits what it stored.
pub(crate) struct Hooks {
    listener: Option<Arc<dyn RevokeListener>>,
}

impl ClientContext for Hooks {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        crate::logs::forward(level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::logs::forward_error(&error, reason);
    }
}

impl ConsumerContext for Hooks {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let (Rebalance::Revoke(tpl), Some(listener)) = (rebalance, &self.listener) else {
            return;
        };
        let partitions: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        listener.revoking(&partitions);
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(())
            | Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not commit before partitions were revoked");
            }
        }
    }
}

/// A member of a consumer group.
pub struct Consumer {
    inner: StreamConsumer<Hooks>,
    group: String,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    pub(crate) fn new(
        mut cfg: ClientConfig,
        group: &str,
        topics: &[String],
        start: StartFrom,
        bus: &BusConfig,
        listener: Option<Arc<dyn RevokeListener>>,
        properties: &BTreeMap<String, String>,
    ) -> Result<Self, BusError> {
        for (k, v) in properties {
            cfg.set(k, v);
        }
        cfg.set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("session.timeout.ms", bus.session_timeout_ms.to_string())
            .set("max.poll.interval.ms", bus.max_poll_interval_ms.to_string())
            .set(
                "auto.offset.reset",
                match start {
                    StartFrom::Earliest => "earliest",
                    StartFrom::Latest => "latest",
                },
            );
        if let Some(instance) = &bus.group_instance_id {
            // One name per group: the stage's group is part of it, so one process can run
            // several stages.
            cfg.set("group.instance.id", format!("{instance}.{group}"));
        }
        let inner: StreamConsumer<Hooks> = cfg
            .create_with_context(Hooks { listener })
            .map_err(BusError::Client)?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        inner.subscribe(&names).map_err(BusError::Client)?;
        Ok(Self {
            inner,
            group: group.to_owned(),
        })
    }

    /// A consumer outside any group, reading `partitions` of `topic` from their beginning.
    /// A consumer outside any group reading `partitions` of `topic`, each from its offset.
    pub(crate) fn reader(
        mut cfg: ClientConfig,
        topic: &str,
        partitions: &[(i32, Offset)],
    ) -> Result<Self, BusError> {
        let group = format!("mediaflow-reader-{}", uuid::Uuid::new_v4());
        cfg.set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest");
        let inner: StreamConsumer<Hooks> = cfg
            .create_with_context(Hooks { listener: None })
            .map_err(BusError::Client)?;
        let mut tpl = TopicPartitionList::new();
        for &(p, from) in partitions {
            tpl.add_partition_offset(topic, p, from)
                .map_err(BusError::Client)?;
        }
        inner.assign(&tpl).map_err(BusError::Client)?;
        Ok(Self { inner, group })
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// Waits for the next message. `BusError::Fatal` means this consumer can never deliver
    /// again and must be replaced; other errors pass.
    pub async fn recv(&self) -> Result<Delivery, BusError> {
        let msg = self
            .inner
            .recv()
            .await
            .map_err(|e| match self.inner.client().fatal_error() {
                Some((code, why)) => BusError::Fatal(format!("{code:?}: {why}")),
                None => BusError::Client(e),
            })?;
        let key = msg.key().map(|k| String::from_utf8_lossy(k).into_owned());
        let event = msg.to_event().map_err(|e| e.to_string());
        let raw = event.is_err().then(|| raw_message(&msg));
        Ok(Delivery {
            topic: msg.topic().to_owned(),
            partition: msg.partition(),
            offset: msg.offset(),
            key,
            event,
            raw,
        })
    }

    /// Stores `next` (one past the last finished offset) as the position of `topic`/`partition`;
    /// it is committed with the next commit.
    pub fn store(&self, topic: &str, partition: i32, next: i64) -> Result<(), BusError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(next))
            .map_err(BusError::Client)?;
        self.inner.store_offsets(&tpl).map_err(BusError::Client)
    }

    /// The partitions (topic, partition) assigned to this consumer now.
    pub fn assignment(&self) -> Result<Vec<(String, i32)>, BusError> {
        Ok(self
            .inner
            .assignment()
            .map_err(BusError::Client)?
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect())
    }

    /// Stops fetching from every assigned partition; `recv` keeps the group membership alive
    /// meanwhile. Messages fetched before the pause are discarded and fetched again on resume.
    pub fn pause_all(&self) -> Result<(), BusError> {
        let assignment = self.inner.assignment().map_err(BusError::Client)?;
        self.inner.pause(&assignment).map_err(BusError::Client)
    }

    /// Resumes fetching from every assigned partition.
    pub fn resume_all(&self) -> Result<(), BusError> {
        let assignment = self.inner.assignment().map_err(BusError::Client)?;
        self.inner.resume(&assignment).map_err(BusError::Client)
    }

    /// Commits every stored offset now and leaves the group.
    pub fn close(&self) -> Result<(), BusError> {
        let committed = match self.inner.commit_consumer_state(CommitMode::Sync) {
            // Nothing stored since the last commit.
            Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )) => Ok(()),
            other => other.map_err(BusError::Client),
        };
        self.inner.unsubscribe();
        committed
    }
}
