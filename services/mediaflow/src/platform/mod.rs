//! Starting the platform: embedded infrastructure (when configured), schema, topics and bucket,
//! then the gateway and every declared stage as tracked tasks under one cancellation token.
//! Which stages there are comes from the pipeline file (`wiring`); a stage's kind in the
//! `Registry` builds its handler, which runs on the stage runtime under its watchdog (`watch`);
//! restarts and failures are `supervise`; infrastructure start-up is `infra`; a sharder's view of
//! its shards is `shards`.

mod infra;
mod shards;
mod status;
mod supervise;
mod watch;
mod wiring;

pub use infra::Services;
pub(crate) use shards::watch_shards;
pub use watch::Wiring;
pub(crate) use watch::consume;
pub use wiring::{DEFAULT_PIPELINE, GATEWAY, StageSpec, Topology};

use infra::{connect, start_infrastructure};
use supervise::{Failure, supervise};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mediaflow_embedded::{EmbeddedKafka, EmbeddedS3, EmbeddedSmtp};
use mediaflow_gateway::Gateway;
use mediaflow_runtime::{Ports, Stopped};
use mediaflow_telemetry::Metrics;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::MediaflowConfig;
use crate::http_source::HttpSource;
use crate::registry::{BuildContext, Registry};

/// What every stage of a process runs with: the configuration, the pipeline, the kinds, and the
/// shared connections.
pub(crate) struct Running {
    config: MediaflowConfig,
    topology: Topology,
    registry: Registry,
    services: Arc<Services>,
    /// Records each stage's state per media item and work item.
    tracker: Arc<dyn mediaflow_runtime::Tracker>,
}

impl Running {
    fn new(
        config: MediaflowConfig,
        topology: Topology,
        registry: Registry,
        services: Arc<Services>,
    ) -> Self {
        let tracker = Arc::new(status::StageStatus::new(
            services.db.clone(),
            &topology,
            &config.bus.topic_prefix,
        ));
        Self {
            config,
            topology,
            registry,
            services,
            tracker,
        }
    }
}

/// Where a running platform can be reached; written to `<data_dir>/endpoints.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Endpoints {
    pub gateway: String,
    pub kafka: String,
    pub s3: String,
    pub database: String,
    pub bucket: String,
    pub topic_prefix: String,
    /// `host:port` of the embedded SMTP sink, when it runs.
    #[serde(default)]
    pub smtp: String,
}

impl Endpoints {
    pub fn file(data_dir: &std::path::Path) -> PathBuf {
        data_dir.join("endpoints.json")
    }
}

/// Drains a platform's stages: see `Platform::stopper`.
#[derive(Clone, Debug)]
pub struct Stopper {
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Stopper {
    /// Stops intake and waits up to `deadline` for the stages to finish and commit; false if
    /// they did not.
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.shutdown.cancel();
        tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_ok()
    }
}

/// A running platform.
pub struct Platform {
    pub endpoints: Endpoints,
    pub gateway_addr: SocketAddr,
    config: MediaflowConfig,
    running: Arc<Running>,
    shutdown: CancellationToken,
    failure: Failure,
    tasks: TaskTracker,
    // Held for their lifetime: dropping them stops the embedded services.
    kafka: Option<EmbeddedKafka>,
    _s3: Option<EmbeddedS3>,
    _smtp: Option<EmbeddedSmtp>,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

/// Runs the gateway or one stage until `shutdown` is cancelled.
pub async fn run_stage(
    name: &str,
    config: &MediaflowConfig,
    shutdown: CancellationToken,
    metrics: Metrics,
) -> Result<Stopped> {
    run_stage_in(name, config, Registry::default(), shutdown, metrics).await
}

/// Runs the gateway or one stage, its kind found in `registry`, until `shutdown` is cancelled.
pub async fn run_stage_in(
    name: &str,
    config: &MediaflowConfig,
    registry: Registry,
    shutdown: CancellationToken,
    metrics: Metrics,
) -> Result<Stopped> {
    let topology = Topology::load(config, &registry)?;
    let runnable = topology.runnable(config);
    if name != GATEWAY && !runnable.iter().any(|s| s == name) {
        bail!(
            "unknown stage `{name}`; runnable: {GATEWAY}, {}",
            runnable.join(", ")
        );
    }
    let services = Arc::new(connect(config, &topology, metrics).await?);
    if name == GATEWAY {
        let listener = bind_gateway(config).await?;
        tracing::info!(addr = %listener.local_addr()?, "gateway listening");
        serve_gateway(config, &services, &topology, listener, shutdown).await?;
        return Ok(Stopped::Drained);
    }
    let admin = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("binding the admin endpoints to {}", config.admin.listen))?;
    tracing::info!(addr = %admin.local_addr()?, "admin endpoints listening");
    let router = mediaflow_gateway::admin::router(
        services.bus.clone(),
        services.store.clone(),
        services.db.clone(),
        services.metrics.clone(),
    );
    let admin = tokio::spawn(
        axum::serve(admin, router)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .into_future(),
    );
    let running = Running::new(config.clone(), topology, registry, services);
    let result = run_stage_with(name, &running, shutdown.clone()).await;
    shutdown.cancel();
    let _ = admin.await;
    result
}

async fn bind_gateway(config: &MediaflowConfig) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(config.gateway.listen)
        .await
        .with_context(|| format!("binding the gateway to {}", config.gateway.listen))
}

/// Serves the REST API on `listener` until `shutdown` is cancelled, then lets in-flight
/// requests finish.
async fn serve_gateway(
    config: &MediaflowConfig,
    s: &Services,
    topology: &Topology,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let spool = config
        .gateway
        .spool_dir
        .clone()
        .unwrap_or_else(|| config.data_dir.join("spool"));
    std::fs::create_dir_all(&spool).with_context(|| format!("creating {}", spool.display()))?;
    let mut gateway_config = config.gateway.clone();
    gateway_config.spool_dir = Some(spool);
    let mut gateway = Gateway::new(
        gateway_config,
        s.store.clone(),
        s.db.clone(),
        s.bus.clone(),
        s.metrics.clone(),
    )?
    .with_upload_stages(topology.upload_stages());
    if topology.declares("users.signed-up") {
        gateway = gateway.with_signup(mediaflow_gateway::users::SignupApi {
            users: mediaflow_users::Users::new(s.db.clone()),
            key: crate::signup::code_key(config)?,
            config: config.signup.clone(),
        });
    }
    axum::serve(listener, gateway.router())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("serving the gateway")
}

/// Runs stage or source `name` of `running` until `shutdown` is cancelled.
async fn run_stage_with(
    name: &str,
    running: &Running,
    shutdown: CancellationToken,
) -> Result<Stopped> {
    let Running {
        config,
        topology,
        registry,
        services,
        tracker,
    } = running;
    if let Some(source) = config.http_source.iter().find(|h| h.name == name) {
        HttpSource::new(
            source.clone(),
            services.db.clone(),
            &services.bus,
            services.metrics.clone(),
        )
        .await?
        .run(shutdown)
        .await?;
        return Ok(Stopped::Drained);
    }
    let spec = topology
        .stage(name)
        .with_context(|| format!("unknown stage `{name}`"))?;
    let kind = registry
        .kind(&spec.kind)
        .with_context(|| format!("stage `{name}`: unknown kind `{}`", spec.kind))?;
    let built = kind.build(
        spec,
        &BuildContext {
            config,
            services,
            topology,
            tracker,
        },
    )?;
    let prefix = &config.bus.topic_prefix;
    let ports: BTreeMap<String, String> = spec
        .outputs
        .iter()
        .map(|(port, topic)| (port.clone(), format!("{prefix}{topic}")))
        .collect();
    let mut options = config.stages.options();
    if let Some(n) = spec.concurrency.or_else(|| kind.concurrency()) {
        options.concurrency = n.max(1);
        options.adaptive = false;
    }
    let wiring = Wiring {
        name: name.to_owned(),
        group: format!("{prefix}{name}"),
        inputs: spec.inputs.iter().map(|i| format!("{prefix}{i}")).collect(),
        consumer: spec.consumer.clone(),
        ports: Ports::new(name, spec.version, ports),
        options,
        stall_timeout: config.stages.stall_timeout(),
        services: services.clone(),
        tracker: tracker.clone(),
        shutdown,
    };
    built.run(wiring).await
}

impl Platform {
    /// Starts everything `config` asks for: embedded infrastructure, the gateway and every stage.
    pub async fn start(config: MediaflowConfig) -> Result<Self> {
        Self::start_with(config, Registry::default()).await
    }

    /// Starts the platform with the stage kinds of `registry` (the shipped ones plus one's own).
    pub async fn start_with(mut config: MediaflowConfig, registry: Registry) -> Result<Self> {
        // A wrong pipeline stops here, before anything starts.
        let topology = Topology::load(&config, &registry)?;
        let enabled = config.stages.enabled.clone();
        let infra::Embedded { kafka, s3, smtp } = start_infrastructure(&mut config).await?;
        if kafka.is_some() && config.bus.group_instance_id.is_none() {
            // The embedded broker serves this platform alone, so its stages keep one identity
            // across restarts (static group membership): a restarted `up` takes its partitions
            // back at once, instead of waiting for the broker to give up on members from before
            // a crash. With an external broker, set `bus.group_instance_id` per process.
            config.bus.group_instance_id = Some("up".into());
        }
        if kafka.is_some() {
            // One process consumes each of its topics, so more partitions would buy no
            // parallelism, only broker work: nisshi reads every partition of a consumer's
            // topics on each round of a fetch, idle or not (about 77 ms of CPU a second with
            // 4 partitions, 32 with 1, for the default pipeline's three consumers).
            config.bus.partitions.get_or_insert(1);
        }
        let services = Arc::new(connect(&config, &topology, Metrics::new()).await?);

        let listener = bind_gateway(&config).await?;
        let gateway_addr = listener.local_addr()?;

        let shutdown = CancellationToken::new();
        let failure = Failure::new(shutdown.clone());
        let tasks = TaskTracker::new();
        {
            let (services, config, token) = (services.clone(), config.clone(), shutdown.clone());
            let (failure, topology) = (failure.clone(), topology.clone());
            tasks.spawn(async move {
                if let Err(e) = serve_gateway(&config, &services, &topology, listener, token).await
                {
                    failure.record(format!("gateway failed: {e:#}"));
                }
            });
        }
        let running = Arc::new(Running::new(
            config.clone(),
            topology,
            registry,
            services.clone(),
        ));
        let stages = running
            .topology
            .runnable(&config)
            .into_iter()
            .filter(|s| enabled.as_ref().is_none_or(|e| e.contains(s)));
        for stage in stages {
            tasks.spawn(supervise(stage, running.clone(), shutdown.clone()));
        }
        tasks.close();
        if let Some(kafka) = &kafka {
            // The broker is supervised: if it dies, the platform stops with an error.
            let (exited, failure, token) = (kafka.exited(), failure.clone(), shutdown.clone());
            let log = kafka.log_path().display().to_string();
            tokio::spawn(async move {
                tokio::select! {
                    status = exited => failure.record(format!("the embedded Kafka broker {status}; see {log}")),
                    () = token.cancelled() => {}
                }
            });
        }

        let endpoints = Endpoints {
            gateway: format!("http://{gateway_addr}"),
            kafka: config.bus.brokers.clone(),
            s3: config.store.endpoint.clone(),
            database: config.database_url(),
            bucket: config.store.bucket.clone(),
            topic_prefix: config.bus.topic_prefix.clone(),
            smtp: smtp
                .as_ref()
                .map(|s| s.addr().to_string())
                .unwrap_or_default(),
        };
        std::fs::write(
            Endpoints::file(&config.data_dir),
            serde_json::to_vec_pretty(&endpoints)?,
        )?;
        tracing::info!(gateway = %endpoints.gateway, kafka = %endpoints.kafka, s3 = %endpoints.s3, "mediaflow is up");
        Ok(Self {
            endpoints,
            gateway_addr,
            config,
            running,
            shutdown,
            failure,
            tasks,
            kafka,
            _s3: s3,
            _smtp: smtp,
        })
    }

    /// The pipeline it runs.
    pub fn topology(&self) -> &Topology {
        &self.running.topology
    }

    pub fn config(&self) -> &MediaflowConfig {
        &self.config
    }

    /// A token that stops the platform when cancelled (also cancelled when a part fails).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops intake, lets stages finish their current message and commit, then stops the
    /// embedded services. Gives up waiting after `deadline`. Fails if any part of the platform
    /// failed while it ran.
    pub async fn stop(self, deadline: Duration) -> Result<()> {
        let drained = self.drain(deadline).await;
        let Platform { running, kafka, .. } = self;
        // The platform's own clients (the shared producer) close while the broker still
        // answers: closed after it, they would retry connecting, log errors and can hold the
        // exit for their socket timeout.
        drop(running);
        if let Some(kafka) = kafka {
            kafka.stop().await;
        }
        drained
    }

    /// Stops intake and lets the stages finish their current message and commit, leaving the
    /// embedded services running (they stop when the platform is dropped). Gives up waiting
    /// after `deadline`. Fails if any part of the platform failed while it ran.
    pub async fn drain(&self, deadline: Duration) -> Result<()> {
        let drained = self.stopper().drain(deadline).await;
        if let Some(failure) = self.failure.take() {
            bail!("{failure}");
        }
        if !drained {
            bail!("stages did not drain within {deadline:?}");
        }
        Ok(())
    }

    /// A handle that drains the platform's stages from where the platform itself is not at hand
    /// (a guard that must not leave them running).
    pub fn stopper(&self) -> Stopper {
        Stopper {
            shutdown: self.shutdown.clone(),
            tasks: self.tasks.clone(),
        }
    }

    /// Waits until the platform is stopped (by its token or a failed part).
    pub async fn stopped(&self) {
        self.shutdown.cancelled().await;
    }
}
