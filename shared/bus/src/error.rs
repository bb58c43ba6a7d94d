//! Errors of the bus.

/// Why a bus operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("kafka client error: {0}")]
    Client(#[source] rdkafka::error::KafkaError),
    #[error("could not create topic `{topic}`: {reason}")]
    CreateTopic { topic: String, reason: String },
    #[error("topics not visible in cluster metadata after {waited_ms} ms: {missing:?}")]
    TopicsMissing {
        missing: Vec<String>,
        waited_ms: u128,
    },
    #[error("could not publish to `{topic}`: {source}")]
    Publish {
        topic: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("could not encode event for Kafka: {0}")]
    Encode(String),
    #[error(transparent)]
    Event(#[from] mediaflow_events::EventError),
    #[error("internal error: {0}")]
    Internal(String),
    /// The client is unusable and must be replaced, e.g. a consumer fenced by another member
    /// with the same `group.instance.id`.
    #[error("kafka client failed for good: {0}")]
    Fatal(String),
}

impl BusError {
    /// Whether retrying the same operation later can succeed (broker down, timeouts).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            BusError::Client(_) | BusError::Publish { .. } | BusError::TopicsMissing { .. }
        )
    }
}
