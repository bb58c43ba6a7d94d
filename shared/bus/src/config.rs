//! Configuration of the connection to Kafka.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How mediaflow reaches Kafka.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    /// Comma-separated `host:port` list of brokers. Under `mediaflow up` with the embedded broker
    /// this is filled in with the broker's address.
    pub brokers: String,
    /// Prefix for every topic name (lets several deployments or test runs share a cluster).
    pub topic_prefix: String,
    /// Partitions of each topic created at start-up (a topic the pipeline file gives its own
    /// count keeps it); see `partitions()` for the default.
    pub partitions: Option<i32>,
    /// Kafka `client.id` reported to the brokers.
    pub client_id: String,
    /// Timeout in milliseconds for admin requests, metadata and produce acknowledgements.
    pub request_timeout_ms: u64,
    /// Consumer session timeout in milliseconds.
    pub session_timeout_ms: u64,
    /// Longest time between two polls of a consumer before it leaves its group, in
    /// milliseconds; also how long a rebalance waits for members to rejoin. Stages keep polling
    /// while they work, so this does not limit job length.
    pub max_poll_interval_ms: u64,
    /// Static group membership (`group.instance.id`): a stable name for this process, such as a
    /// StatefulSet pod name. A restarted process with the same name takes over its partitions
    /// at once instead of waiting for the group to notice the old one is gone.
    pub group_instance_id: Option<String>,
    /// Extra librdkafka properties applied to every client (e.g. `security.protocol`).
    pub librdkafka: BTreeMap<String, String>,
}

impl BusConfig {
    /// Partitions of topics created at start-up: `partitions`, else 4. (`mediaflow up` on its
    /// embedded broker sets 1 when unset: one process consumes each topic there, and the
    /// broker reads every partition of a consumer's topics on each poll round.)
    pub fn partitions(&self) -> i32 {
        self.partitions.unwrap_or(4)
    }
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: String::new(),
            partitions: None,
            client_id: "mediaflow".into(),
            request_timeout_ms: 30_000,
            session_timeout_ms: 30_000,
            max_poll_interval_ms: 300_000,
            group_instance_id: None,
            librdkafka: BTreeMap::new(),
        }
    }
}

impl BusConfig {
    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}
