//! Publishing events: CloudEvents in Kafka binary mode (`ce_*` headers, JSON payload), keyed by
//! the event's subject, acknowledged by every in-sync replica before `publish` returns.

use std::time::Duration;

use cloudevents::binding::rdkafka::{FutureRecordExt, MessageRecord};
use mediaflow_events::EventData;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::BusError;
use crate::logs::Quiet;

/// Where an acknowledged event landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    pub partition: i32,
    pub offset: i64,
}

/// A producer of mediaflow events for one stage.
#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer<Quiet>,
    source: String,
    timeout: Duration,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    pub(crate) fn new(
        mut cfg: ClientConfig,
        source: &str,
        timeout: Duration,
    ) -> Result<Self, BusError> {
        // Not the idempotent producer: its sequence state does not survive a restart of the
        // embedded broker (every later send fails), and consumers already drop duplicates by
        // event id. One request in flight keeps retries from reordering a partition.
        cfg.set("enable.idempotence", "false")
            .set("max.in.flight.requests.per.connection", "1")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", timeout.as_millis().to_string());
        let producer: FutureProducer<Quiet> =
            cfg.create_with_context(Quiet).map_err(BusError::Client)?;
        Ok(Self {
            producer,
            source: source.to_owned(),
            timeout,
        })
    }

    /// A publisher sharing this one's producer (its connections and buffers) that stamps
    /// `source` on the events it builds.
    pub fn with_source(&self, source: &str) -> Self {
        Self {
            producer: self.producer.clone(),
            source: source.to_owned(),
            timeout: self.timeout,
        }
    }

    /// The CloudEvents `source` this publisher stamps on events.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Publishes `data` on `topic` and waits for the broker's acknowledgement.
    pub async fn publish<T: EventData>(
        &self,
        topic: &str,
        data: &T,
    ) -> Result<Published, BusError> {
        let event = mediaflow_events::encode(data, &self.source)?;
        self.publish_event(topic, &data.subject(), event).await
    }

    /// Publishes an already built event (a replay) on `topic` with partition key `key`.
    pub async fn publish_event(
        &self,
        topic: &str,
        key: &str,
        event: cloudevents::Event,
    ) -> Result<Published, BusError> {
        self.send(topic, None, key, event).await
    }

    /// Publishes `event` on partition `partition` of `topic` with key `key`.
    pub async fn publish_to(
        &self,
        topic: &str,
        partition: i32,
        key: &str,
        event: cloudevents::Event,
    ) -> Result<Published, BusError> {
        self.send(topic, Some(partition), key, event).await
    }

    async fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &str,
        event: cloudevents::Event,
    ) -> Result<Published, BusError> {
        let record =
            MessageRecord::from_event(event).map_err(|e| BusError::Encode(e.to_string()))?;
        let mut to = FutureRecord::to(topic).key(key).message_record(&record);
        if let Some(p) = partition {
            to = to.partition(p);
        }
        match self.producer.send(to, self.timeout).await {
            Ok(d) => Ok(Published {
                partition: d.partition,
                offset: d.offset,
            }),
            Err((source, _)) => Err(BusError::Publish {
                topic: topic.to_owned(),
                source,
            }),
        }
    }

    /// The partition librdkafka's default partitioner (`consistent_random`) gives `key` among
    /// `partitions`: CRC-32 of the key, modulo the count.
    pub fn partition_for(key: &str, partitions: i32) -> i32 {
        (crc32fast::hash(key.as_bytes()) % partitions.max(1) as u32) as i32
    }

    /// Waits for every queued message to be acknowledged.
    pub fn flush(&self) -> Result<(), BusError> {
        self.producer.flush(self.timeout).map_err(BusError::Client)
    }
}
