//! Publishing events: CloudEvents in Kafka binary mode (`ce_*` headers, JSON payload), keyed by
//! the event's subject, acknowledged by every in-sync replica before `publish` returns.
//!
//! Acknowledgements reach the waiting `publish` calls through one thread per producer that
//! waits on librdkafka's event queue in one-second rounds. (rdkafka's `FutureProducer` polls in
//! 100 ms rounds and busy-polls through the last, partial millisecond of each: two producers
//! took 1.5% of a core doing nothing, BENCHMARKS.md, the tagging bench.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cloudevents::binding::rdkafka::{BaseRecordExt, MessageRecord};
use mediaflow_events::EventData;
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use tokio::sync::oneshot;

use crate::BusError;
use crate::logs::Quiet;

/// How long the acknowledgement thread waits on the event queue in one round; it notices that
/// its producer was dropped between rounds.
const ACK_ROUND: Duration = Duration::from_secs(1);

/// How long a send waits before trying again when librdkafka's local queue is full.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(100);

/// Where a delivery report goes: the `publish` call waiting for it.
type Ack = oneshot::Sender<Result<Published, KafkaError>>;

/// The producer's context: logs like every client, and hands each delivery report to its
/// waiting `publish` call.
struct Acks;

impl ClientContext for Acks {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        Quiet.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        Quiet.error(error, reason);
    }
}

impl ProducerContext for Acks {
    type DeliveryOpaque = Box<Ack>;

    fn delivery(&self, result: &DeliveryResult<'_>, ack: Box<Ack>) {
        let report = match result {
            Ok(m) => Ok(Published {
                partition: m.partition(),
                offset: m.offset(),
            }),
            Err((e, _)) => Err(e.clone()),
        };
        // The caller may have stopped waiting.
        let _ = ack.send(report);
    }
}

/// A librdkafka producer and the thread that serves its delivery reports; the thread stops
/// within `ACK_ROUND` of the last publisher's drop.
struct Shared {
    producer: Arc<BaseProducer<Acks>>,
    stop: Arc<AtomicBool>,
}

impl Shared {
    fn new(cfg: &ClientConfig) -> Result<Self, BusError> {
        let producer: Arc<BaseProducer<Acks>> =
            Arc::new(cfg.create_with_context(Acks).map_err(BusError::Client)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (producer.clone(), stop.clone());
        std::thread::Builder::new()
            .name("mediaflow-acks".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    p.poll(ACK_ROUND);
                }
            })
            .map_err(|e| {
                BusError::Client(KafkaError::ClientCreation(format!(
                    "starting the producer's acknowledgement thread: {e}"
                )))
            })?;
        Ok(Self { producer, stop })
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Where an acknowledged event landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    pub partition: i32,
    pub offset: i64,
}

/// A producer of mediaflow events for one stage.
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
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
        Ok(Self {
            shared: Arc::new(Shared::new(&cfg)?),
            source: source.to_owned(),
            timeout,
        })
    }

    /// A publisher sharing this one's producer (its connections and buffers) that stamps
    /// `source` on the events it builds.
    pub fn with_source(&self, source: &str) -> Self {
        Self {
            shared: self.shared.clone(),
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
        let plain: BaseRecord<'_, str, Vec<u8>> = BaseRecord::to(topic)
            .key(key)
            .message_record(&record)
            .map_err(|e| BusError::Encode(e.to_string()))?;
        let (ack, acked) = oneshot::channel();
        let mut to = BaseRecord {
            topic: plain.topic,
            partition: partition.or(plain.partition),
            payload: plain.payload,
            key: plain.key,
            timestamp: plain.timestamp,
            headers: plain.headers,
            delivery_opaque: Box::new(ack),
        };
        let failed = |source| BusError::Publish {
            topic: topic.to_owned(),
            source,
        };
        let started = Instant::now();
        loop {
            match self.shared.producer.send(to) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if started.elapsed() < self.timeout =>
                {
                    to = back;
                    tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
                }
                Err((e, _)) => return Err(failed(e)),
            }
        }
        match acked.await {
            Ok(report) => report.map_err(failed),
            // Only a producer destroyed with the message queued drops its report.
            Err(_) => Err(failed(KafkaError::Canceled)),
        }
    }

    /// The partition librdkafka's default partitioner (`consistent_random`) gives `key` among
    /// `partitions`: CRC-32 of the key, modulo the count.
    pub fn partition_for(key: &str, partitions: i32) -> i32 {
        (crc32fast::hash(key.as_bytes()) % partitions.max(1) as u32) as i32
    }

    /// Waits for every queued message to be acknowledged.
    pub fn flush(&self) -> Result<(), BusError> {
        self.shared
            .producer
            .flush(self.timeout)
            .map_err(BusError::Client)
    }
}
