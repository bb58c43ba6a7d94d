//! Infrastructure start-up: the embedded broker, S3 server and SMTP sink when configured (their
//! addresses filled into the configuration), then the connections every part shares, with topics, bucket
//! and schema prepared.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use mediaflow_bus::{Bus, Publisher};
use mediaflow_db::Db;
use mediaflow_embedded::{EmbeddedKafka, EmbeddedS3, EmbeddedSmtp};
use mediaflow_store::ObjectStore;
use mediaflow_telemetry::Metrics;

use super::wiring::Topology;
use crate::MediaflowConfig;

/// Connections shared by the gateway and the stages.
pub struct Services {
    pub bus: Bus,
    /// The producer every stage of the process publishes with.
    pub publisher: Publisher,
    pub store: ObjectStore,
    pub db: Db,
    pub metrics: Metrics,
}

/// The embedded services a platform started; dropping one stops it.
pub(super) struct Embedded {
    pub kafka: Option<EmbeddedKafka>,
    pub s3: Option<EmbeddedS3>,
    pub smtp: Option<EmbeddedSmtp>,
}

/// Starts the embedded services the configuration asks for and fills in their addresses.
pub(super) async fn start_infrastructure(config: &mut MediaflowConfig) -> Result<Embedded> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data folder {}", config.data_dir.display()))?;
    let kafka = if config.embedded.kafka {
        let broker = mediaflow_embedded::find_broker(config.embedded.broker_bin.as_deref())?;
        let dir = config.data_dir.join("kafka");
        let kafka = match config.embedded.kafka_port {
            0 => {
                // A port found free can be taken by someone else before the broker binds it:
                // try a few.
                let mut attempt = 0;
                loop {
                    let port = mediaflow_embedded::free_port()?;
                    match EmbeddedKafka::start(&broker, &dir, port).await {
                        Ok(kafka) => break kafka,
                        Err(e) if attempt < 3 => {
                            tracing::warn!(port, error = %e, "embedded broker did not start; another port");
                            attempt += 1;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            port => EmbeddedKafka::start(&broker, &dir, port).await?,
        };
        config.bus.brokers = kafka.bootstrap().to_owned();
        Some(kafka)
    } else {
        None
    };
    let s3 = if config.embedded.s3 {
        let addr = SocketAddr::from(([127, 0, 0, 1], config.embedded.s3_port));
        let s3 = EmbeddedS3::start(
            &config.data_dir.join("s3"),
            addr,
            &config.store.access_key,
            &config.store.secret_key,
        )
        .await?;
        config.store.endpoint = s3.endpoint();
        Some(s3)
    } else {
        None
    };
    let smtp = if config.embedded.smtp && config.mail.host.is_empty() {
        let dir = config.data_dir.join("mail");
        let smtp = EmbeddedSmtp::start(&dir, config.embedded.smtp_port)
            .await
            .with_context(|| format!("starting the SMTP sink (mail kept in {})", dir.display()))?;
        config.mail.host = smtp.addr().ip().to_string();
        config.mail.port = smtp.addr().port();
        config.mail.tls = mediaflow_signup::TlsMode::None;
        config.mail.username.clear();
        Some(smtp)
    } else {
        None
    };
    Ok(Embedded { kafka, s3, smtp })
}

/// Connects to Kafka, S3 and the database, creating topics (the platform's and those `topology`
/// declares), bucket and schema as needed.
pub(super) async fn connect(
    config: &MediaflowConfig,
    topology: &Topology,
    metrics: Metrics,
) -> Result<Services> {
    let bus = Bus::new(config.bus.clone());
    let mut topics = bus.topics().declared(config.bus.partitions());
    for declared in topology.topic_specs(&config.bus.topic_prefix, config.bus.partitions()) {
        match topics.iter_mut().find(|t| t.name == declared.name) {
            Some(t) => *t = declared,
            None => topics.push(declared),
        }
    }
    bus.ensure_topics(&topics)
        .await
        .with_context(|| format!("declaring topics on Kafka at {}", config.bus.brokers))?;
    let publisher = bus.publisher("/mediaflow")?;
    let store = ObjectStore::new(&config.store);
    match store.ensure_bucket().await {
        Ok(()) => {}
        // S3 down at start-up is an outage like any other: stages retry their work, the
        // gateway answers 503, readiness says why. The bucket is prepared by whichever process
        // starts while S3 is up.
        Err(e) if e.is_transient() => {
            tracing::warn!(error = %e, endpoint = %config.store.endpoint, "object store unreachable at start-up; going on");
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "preparing bucket `{}` at {}",
                    config.store.bucket, config.store.endpoint
                )
            });
        }
    }
    let db = Db::connect(&config.database_url(), config.database.max_connections)
        .await
        .context("connecting to the database")?;
    Ok(Services {
        bus,
        publisher,
        store,
        db,
        metrics,
    })
}
