//! Topic declaration through the Kafka Admin API.

use std::time::{Duration, Instant};

use mediaflow_events::TopicSpec;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use crate::BusError;
use crate::logs::Quiet;

pub(crate) async fn ensure_topics(
    cfg: ClientConfig,
    specs: &[TopicSpec],
    timeout: Duration,
) -> Result<(), BusError> {
    let admin: AdminClient<Quiet> = cfg.create_with_context(Quiet).map_err(BusError::Client)?;
    let retention: Vec<String> = specs
        .iter()
        .map(|s| s.retention.as_millis().to_string())
        .collect();
    let new: Vec<NewTopic<'_>> = specs
        .iter()
        .zip(&retention)
        .map(|(s, ms)| {
            NewTopic::new(&s.name, s.partitions, TopicReplication::Fixed(-1))
                .set("retention.ms", ms)
        })
        .collect();
    let opts = AdminOptions::new()
        .request_timeout(Some(timeout))
        .operation_timeout(Some(timeout));
    let results = admin
        .create_topics(&new, &opts)
        .await
        .map_err(BusError::Client)?;
    for result in results {
        match result {
            Ok(name) => tracing::info!(topic = %name, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(BusError::CreateTopic {
                    topic,
                    reason: code.to_string(),
                });
            }
        }
    }
    wait_visible(cfg, specs, timeout).await
}

/// Waits until every topic appears in metadata with all its partitions.
async fn wait_visible(
    cfg: ClientConfig,
    specs: &[TopicSpec],
    timeout: Duration,
) -> Result<(), BusError> {
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer<Quiet> =
            cfg.create_with_context(Quiet).map_err(BusError::Client)?;
        let started = Instant::now();
        loop {
            let md = consumer
                .fetch_metadata(None, timeout)
                .map_err(BusError::Client)?;
            let missing: Vec<String> = names
                .iter()
                .filter(|n| {
                    !md.topics()
                        .iter()
                        .any(|t| t.name() == n.as_str() && !t.partitions().is_empty())
                })
                .cloned()
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(BusError::TopicsMissing {
                    missing,
                    waited_ms: started.elapsed().as_millis(),
                });
            }
            // Metadata polling: the Admin API answered, the cluster has not propagated yet.
            std::thread::park_timeout(Duration::from_millis(100));
        }
    })
    .await
    .map_err(|e| BusError::Internal(e.to_string()))?
}
