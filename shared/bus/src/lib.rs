//! The event bus. Declares topics, publishes CloudEvents in Kafka binary mode and consumes them
//! with at-least-once semantics. Only this crate links rdkafka; everything else sees `Bus`,
//! `Publisher` and `Consumer`.

mod admin;
mod config;
mod consumer;
mod error;
mod logs;
mod publisher;

pub use config::BusConfig;
pub use consumer::{Consumer, Delivery, RevokeListener, StartFrom};
pub use error::BusError;
pub use publisher::{Published, Publisher};

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use logs::Quiet;
use mediaflow_events::{TopicSpec, Topics};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{ClientConfig, Offset};

/// A handle to the Kafka cluster mediaflow runs on.
#[derive(Clone)]
pub struct Bus {
    config: BusConfig,
    /// The clients of metadata, watermark and committed-offset queries, created on first use
    /// and reused: one outside any group (`None`), one for each group asked about. (A client
    /// made for each query cost a connection, its threads and a metadata round trip: the
    /// emission relay asked twice per emission, the watchdog every few seconds per stage.)
    queries: Arc<Mutex<QueryClients>>,
}

/// The query clients by group (`None`: outside any group).
type QueryClients = HashMap<Option<String>, Arc<BaseConsumer<Quiet>>>;

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Bus {
    pub fn new(config: BusConfig) -> Self {
        Self {
            config,
            queries: Arc::default(),
        }
    }

    /// The query client of `group` (or of no group), made on first use.
    fn query_client(&self, group: Option<&str>) -> Result<Arc<BaseConsumer<Quiet>>, BusError> {
        let mut clients = self
            .queries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(client) = clients.get(&group.map(str::to_owned)) {
            return Ok(client.clone());
        }
        let mut cfg = self.client_config();
        if let Some(group) = group {
            cfg.set("group.id", group)
                .set("enable.auto.commit", "false");
        }
        let client: Arc<BaseConsumer<Quiet>> =
            Arc::new(cfg.create_with_context(Quiet).map_err(BusError::Client)?);
        clients.insert(group.map(str::to_owned), client.clone());
        Ok(client)
    }

    /// Runs `query` on the query client of `group` on the blocking pool (librdkafka's queries
    /// block).
    async fn query<T: Send + 'static>(
        &self,
        group: Option<&str>,
        query: impl FnOnce(&BaseConsumer<Quiet>, Duration) -> Result<T, BusError> + Send + 'static,
    ) -> Result<T, BusError> {
        let client = self.query_client(group)?;
        let timeout = self.config.request_timeout();
        tokio::task::spawn_blocking(move || {
            // Nobody else polls it: what it queued meanwhile (errors while the broker was
            // away) is dropped here, already logged by its context.
            while client.poll(Duration::ZERO).is_some() {}
            query(&client, timeout)
        })
        .await
        .map_err(|e| BusError::Internal(e.to_string()))?
    }

    pub fn config(&self) -> &BusConfig {
        &self.config
    }

    /// The platform's topic names, under the configured prefix.
    pub fn topics(&self) -> Topics {
        Topics::new(self.config.topic_prefix.clone())
    }

    fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.config.brokers)
            .set("client.id", &self.config.client_id)
            .set("socket.keepalive.enable", "true")
            // Warnings and up: every lost connection is otherwise logged at info.
            .set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
        for (k, v) in &self.config.librdkafka {
            cfg.set(k, v);
        }
        cfg
    }

    /// Creates every topic in `specs` that does not exist yet and waits until all are visible.
    pub async fn ensure_topics(&self, specs: &[TopicSpec]) -> Result<(), BusError> {
        admin::ensure_topics(self.client_config(), specs, self.config.request_timeout()).await
    }

    /// Creates the platform's declared topics.
    pub async fn ensure_platform_topics(&self) -> Result<(), BusError> {
        self.ensure_topics(&self.topics().declared(self.config.partitions()))
            .await
    }

    /// A producer that stamps events with `source` (a stage URI such as `/mediaflow/gateway`).
    pub fn publisher(&self, source: &str) -> Result<Publisher, BusError> {
        Publisher::new(self.client_config(), source, self.config.request_timeout())
    }

    /// A consumer in group `group` subscribed to `topics`.
    pub fn consumer(
        &self,
        group: &str,
        topics: &[String],
        start: StartFrom,
    ) -> Result<Consumer, BusError> {
        Consumer::new(
            self.client_config(),
            group,
            topics,
            start,
            &self.config,
            None,
            &BTreeMap::new(),
        )
    }

    /// A consumer in group `group` subscribed to `topics` that tells `listener` before
    /// partitions are revoked, and commits what it stored for them once it returns; with
    /// librdkafka `properties` of its own over `bus.librdkafka` (not the group, offset or
    /// membership settings it makes itself, which win).
    pub fn consumer_with(
        &self,
        group: &str,
        topics: &[String],
        start: StartFrom,
        listener: Arc<dyn RevokeListener>,
        properties: &BTreeMap<String, String>,
    ) -> Result<Consumer, BusError> {
        Consumer::new(
            self.client_config(),
            group,
            topics,
            start,
            &self.config,
            Some(listener),
            properties,
        )
    }

    /// Every message retained on `topic` at the time of the call, in partition order.
    pub async fn read_to_end(&self, topic: &str) -> Result<Vec<Delivery>, BusError> {
        let timeout = self.config.request_timeout();
        // The end of each partition now; messages published later are not waited for.
        let ends = self.watermarks(topic).await?;
        let mut pending: HashMap<i32, i64> = ends
            .iter()
            .filter(|(_, low, high)| high > low)
            .map(|&(p, _, high)| (p, high))
            .collect();
        let mut out = Vec::new();
        if pending.is_empty() {
            return Ok(out);
        }
        let partitions: Vec<(i32, Offset)> =
            pending.keys().map(|&p| (p, Offset::Beginning)).collect();
        let reader = Consumer::reader(self.client_config(), topic, &partitions)?;
        while !pending.is_empty() {
            let delivery = tokio::time::timeout(timeout, reader.recv())
                .await
                .map_err(|_| BusError::Internal(format!("reading {topic} timed out")))??;
            if let Some(&end) = pending.get(&delivery.partition) {
                if delivery.offset + 1 >= end {
                    pending.remove(&delivery.partition);
                }
                if delivery.offset < end {
                    out.push(delivery);
                }
            }
        }
        out.sort_by_key(|d| (d.partition, d.offset));
        Ok(out)
    }

    /// How many partitions `topic` has.
    pub async fn partition_count(&self, topic: &str) -> Result<i32, BusError> {
        let marks = self.watermarks(topic).await?;
        match marks.len() {
            0 => Err(BusError::Internal(format!(
                "topic {topic} has no partitions"
            ))),
            n => Ok(n as i32),
        }
    }

    /// The offset the next message on `partition` of `topic` will get (its high watermark).
    pub async fn end_offset(&self, topic: &str, partition: i32) -> Result<i64, BusError> {
        let topic = topic.to_owned();
        self.query(None, move |client, timeout| {
            let (_, high) = client
                .fetch_watermarks(&topic, partition, timeout)
                .map_err(BusError::Client)?;
            Ok(high)
        })
        .await
    }

    async fn watermarks(&self, topic: &str) -> Result<Vec<(i32, i64, i64)>, BusError> {
        let topic = topic.to_owned();
        self.query(None, move |client, timeout| {
            watermarks(client, &topic, timeout)
        })
        .await
    }

    /// The offset of the event with id `id` on `partition` of `topic` at or after offset
    /// `from`, if it is there now: how a publisher that may have crashed after a send finds out
    /// whether the send landed.
    pub async fn find_event(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        id: &str,
    ) -> Result<Option<i64>, BusError> {
        use cloudevents::AttributesReader;
        let end = self.end_offset(topic, partition).await?;
        if end <= from {
            return Ok(None);
        }
        let timeout = self.config.request_timeout();
        let reader = Consumer::reader(
            self.client_config(),
            topic,
            &[(partition, Offset::Offset(from))],
        )?;
        loop {
            let delivery = tokio::time::timeout(timeout, reader.recv())
                .await
                .map_err(|_| BusError::Internal(format!("reading {topic} timed out")))??;
            if delivery.event.as_ref().is_ok_and(|e| e.id() == id) {
                return Ok(Some(delivery.offset));
            }
            if delivery.offset + 1 >= end {
                return Ok(None);
            }
        }
    }

    /// Number of messages retained on `topic`: the sum over its partitions of high minus low
    /// watermark.
    pub async fn message_count(&self, topic: &str) -> Result<i64, BusError> {
        let marks = self.watermarks(topic).await?;
        Ok(marks.iter().map(|&(_, low, high)| high - low).sum())
    }

    /// How many messages of `topic` consumer group `group` has not committed yet, summed over
    /// partitions (a partition without a committed offset counts whole).
    pub async fn group_lag(&self, group: &str, topic: &str) -> Result<i64, BusError> {
        Ok(self
            .group_positions(group, std::slice::from_ref(&topic.to_owned()))
            .await?
            .iter()
            .map(PartitionPosition::lag)
            .sum())
    }

    /// Where consumer group `group` stands on every partition of `topics`: its committed offset
    /// against the partition's watermarks.
    pub async fn group_positions(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<Vec<PartitionPosition>, BusError> {
        let topics = topics.to_vec();
        self.query(Some(group), move |consumer, timeout| {
            let mut positions = Vec::new();
            for topic in &topics {
                let marks = watermarks(consumer, topic, timeout)?;
                let mut tpl = rdkafka::TopicPartitionList::new();
                for &(partition, _, _) in &marks {
                    tpl.add_partition(topic, partition);
                }
                let committed = consumer
                    .committed_offsets(tpl, timeout)
                    .map_err(BusError::Client)?;
                for &(partition, low, high) in &marks {
                    let committed = match committed
                        .find_partition(topic, partition)
                        .map(|e| e.offset())
                    {
                        Some(Offset::Offset(at)) => Some(at),
                        _ => None,
                    };
                    positions.push(PartitionPosition {
                        topic: topic.clone(),
                        partition,
                        committed,
                        low,
                        high,
                    });
                }
            }
            Ok(positions)
        })
        .await
    }

    /// Moves consumer group `group` back to the oldest retained message of every partition of
    /// `topics`, so its stage handles them all again (an operator's offset reset). The group
    /// must have no other members: this joins it to commit, as brokers take commits from members
    /// only.
    pub async fn rewind_group(&self, group: &str, topics: &[String]) -> Result<(), BusError> {
        let mut cfg = self.client_config();
        cfg.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set(
                "session.timeout.ms",
                self.config.session_timeout_ms.to_string(),
            );
        let timeout = self.config.request_timeout();
        let topics = topics.to_vec();
        let group = group.to_owned();
        tokio::task::spawn_blocking(move || {
            use rdkafka::consumer::CommitMode;
            let consumer: BaseConsumer<Quiet> =
                cfg.create_with_context(Quiet).map_err(BusError::Client)?;
            let mut wanted = rdkafka::TopicPartitionList::new();
            for topic in &topics {
                for (partition, low, _) in watermarks(&consumer, topic, timeout)? {
                    wanted
                        .add_partition_offset(topic, partition, Offset::Offset(low))
                        .map_err(BusError::Client)?;
                }
            }
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            consumer.subscribe(&names).map_err(BusError::Client)?;
            // Joined once every partition is assigned to this lone member.
            let until = std::time::Instant::now() + timeout * 4;
            loop {
                if let Some(Err(e)) = consumer.poll(Duration::from_millis(100)) {
                    tracing::debug!(error = %e, "while joining to rewind");
                }
                let held = consumer.assignment().map_err(BusError::Client)?.count();
                if held >= wanted.count() {
                    break;
                }
                if std::time::Instant::now() > until {
                    return Err(BusError::Internal(format!(
                        "could not join group `{group}` to rewind it (does it have other members?)"
                    )));
                }
            }
            consumer
                .commit(&wanted, CommitMode::Sync)
                .map_err(BusError::Client)?;
            consumer.unsubscribe();
            Ok(())
        })
        .await
        .map_err(|e| BusError::Internal(e.to_string()))?
    }

    /// How many members consumer group `group` has now (0 when it has none or does not exist).
    pub async fn group_members(&self, group: &str) -> Result<usize, BusError> {
        let group = group.to_owned();
        self.query(None, move |consumer, timeout| {
            let groups = consumer
                .fetch_group_list(Some(&group), timeout)
                .map_err(BusError::Client)?;
            Ok(groups
                .groups()
                .iter()
                .filter(|g| g.name() == group)
                .map(|g| g.members().len())
                .sum())
        })
        .await
    }

    /// Checks that the cluster answers a metadata request within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> Result<(), BusError> {
        self.query(None, move |client, _| {
            client
                .fetch_metadata(None, timeout)
                .map_err(BusError::Client)?;
            Ok(())
        })
        .await
    }
}

/// A consumer group's position on one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionPosition {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset (the next message it will read), if it has one.
    pub committed: Option<i64>,
    /// The oldest offset retained.
    pub low: i64,
    /// One past the newest message.
    pub high: i64,
}

impl PartitionPosition {
    /// Messages not committed yet (all retained ones without a committed offset).
    pub fn lag(&self) -> i64 {
        (self.high - self.committed.unwrap_or(self.low).max(self.low)).max(0)
    }
}

/// (partition, low watermark, high watermark) of every partition of `topic`. Blocking.
fn watermarks(
    consumer: &BaseConsumer<Quiet>,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<(i32, i64, i64)>, BusError> {
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(BusError::Client)?;
    let mut marks = Vec::new();
    for t in md.topics() {
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), timeout)
                .map_err(BusError::Client)?;
            marks.push((p.id(), low, high));
        }
    }
    Ok(marks)
}
