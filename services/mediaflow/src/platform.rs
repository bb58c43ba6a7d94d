//! Starting the platform: embedded infrastructure (when configured), schema, topics and bucket,
//! then the gateway and every stage as tracked tasks under one cancellation token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mediaflow_bus::{Bus, StartFrom};
use mediaflow_db::Db;
use mediaflow_embedded::{EmbeddedKafka, EmbeddedS3};
use mediaflow_gateway::Gateway;
use mediaflow_image_worker::ImageWorker;
use mediaflow_router::Router;
use mediaflow_runtime::{
    DeadLetters, Handler, Observation, StageProbe, StageRun, Stopped, Verdict, Watchdog,
};
use mediaflow_store::ObjectStore;
use mediaflow_telemetry::Metrics;
use mediaflow_video_worker::VideoWorker;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::MediaflowConfig;
use crate::http_source::HttpSource;

/// The built-in stages; configured exec stages come on top (`stages`).
pub const STAGES: &[&str] = &[
    mediaflow_router::STAGE,
    mediaflow_image_worker::STAGE,
    mediaflow_video_worker::STAGE,
];

const GATEWAY: &str = "gateway";

/// Every stage `config` defines: the built-in ones, its exec stages, then its sources (which run
/// and are supervised like stages).
pub fn stages(config: &MediaflowConfig) -> Vec<String> {
    STAGES
        .iter()
        .map(|s| (*s).to_owned())
        .chain(config.exec.iter().map(|e| e.name.clone()))
        .chain(config.http_source.iter().map(|s| s.name.clone()))
        .collect()
}

/// Checks the stage definitions: exec and source names are unique and do not shadow anything.
fn check_stages(config: &MediaflowConfig) -> Result<()> {
    config.image_worker.check().map_err(anyhow::Error::msg)?;
    config.video_worker.check().map_err(anyhow::Error::msg)?;
    let mut seen = std::collections::HashSet::from([GATEWAY.to_owned()]);
    for name in stages(config) {
        if !seen.insert(name.clone()) {
            bail!(
                "stage name `{name}` is used twice (exec stages and sources need names of their own)"
            );
        }
    }
    if let Some(unknown) = config
        .stages
        .enabled
        .iter()
        .flatten()
        .find(|s| !stages(config).contains(s))
    {
        bail!(
            "stages.enabled names unknown stage `{unknown}`; stages: {}",
            stages(config).join(", ")
        );
    }
    Ok(())
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
}

impl Endpoints {
    pub fn file(data_dir: &std::path::Path) -> PathBuf {
        data_dir.join("endpoints.json")
    }
}

/// A running platform.
pub struct Platform {
    pub endpoints: Endpoints,
    pub gateway_addr: SocketAddr,
    config: MediaflowConfig,
    shutdown: CancellationToken,
    failure: Failure,
    tasks: TaskTracker,
    // Held for their lifetime: dropping them stops the embedded services.
    kafka: Option<EmbeddedKafka>,
    _s3: Option<EmbeddedS3>,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

/// Connections shared by the gateway and the stages.
struct Services {
    bus: Bus,
    store: ObjectStore,
    db: Db,
    metrics: Metrics,
}

/// Starts the embedded services the configuration asks for and fills in their addresses.
async fn start_infrastructure(
    config: &mut MediaflowConfig,
) -> Result<(Option<EmbeddedKafka>, Option<EmbeddedS3>)> {
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
    Ok((kafka, s3))
}

/// Connects to Kafka, S3 and the database, creating topics, bucket and schema as needed.
async fn connect(config: &MediaflowConfig, metrics: Metrics) -> Result<Services> {
    let bus = Bus::new(config.bus.clone());
    bus.ensure_platform_topics()
        .await
        .with_context(|| format!("declaring topics on Kafka at {}", config.bus.brokers))?;
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
        store,
        db,
        metrics,
    })
}

/// Runs the gateway or one stage until `shutdown` is cancelled.
pub async fn run_stage(
    name: &str,
    config: &MediaflowConfig,
    shutdown: CancellationToken,
    metrics: Metrics,
) -> Result<Stopped> {
    check_stages(config)?;
    if name != GATEWAY && !stages(config).iter().any(|s| s == name) {
        bail!(
            "unknown stage `{name}`; runnable: gateway, {}",
            stages(config).join(", ")
        );
    }
    let services = connect(config, metrics).await?;
    if name == GATEWAY {
        let listener = bind_gateway(config).await?;
        tracing::info!(addr = %listener.local_addr()?, "gateway listening");
        serve_gateway(config, &services, listener, shutdown).await?;
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
    let result = run_stage_with(name, config, &services, shutdown.clone()).await;
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
    let gateway = Gateway::new(
        gateway_config,
        s.store.clone(),
        s.db.clone(),
        s.bus.clone(),
        s.metrics.clone(),
    )?;
    axum::serve(listener, gateway.router())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("serving the gateway")
}

async fn run_stage_with(
    name: &str,
    config: &MediaflowConfig,
    s: &Services,
    shutdown: CancellationToken,
) -> Result<Stopped> {
    match name {
        mediaflow_router::STAGE => {
            let handler = Router::new(&s.bus)?;
            consume(
                name,
                &Router::input_topics(&s.bus),
                handler,
                config,
                s,
                shutdown,
            )
            .await
        }
        mediaflow_image_worker::STAGE => {
            let handler = ImageWorker::new(
                config.image_worker.clone(),
                s.store.clone(),
                s.db.clone(),
                &s.bus,
            )?;
            consume(
                name,
                &ImageWorker::input_topics(&s.bus),
                handler,
                config,
                s,
                shutdown,
            )
            .await
        }
        mediaflow_video_worker::STAGE => {
            let handler = VideoWorker::new(
                config.video_worker.clone(),
                config.data_dir.join("video"),
                s.store.clone(),
                s.db.clone(),
                &s.bus,
            )?;
            consume(
                name,
                &VideoWorker::input_topics(&s.bus),
                handler,
                config,
                s,
                shutdown,
            )
            .await
        }
        other => {
            if let Some(source) = config.http_source.iter().find(|h| h.name == other) {
                HttpSource::new(source.clone(), s.db.clone(), &s.bus, s.metrics.clone())
                    .await?
                    .run(shutdown)
                    .await?;
                return Ok(Stopped::Drained);
            }
            let exec = config
                .exec
                .iter()
                .find(|e| e.name == other)
                .with_context(|| format!("unknown stage `{other}`"))?;
            let work_dir = config.data_dir.join("exec");
            let handler = mediaflow_exec_worker::ExecWorker::new(
                exec.clone(),
                work_dir,
                s.store.clone(),
                s.db.clone(),
                &s.bus,
            )?;
            let inputs = handler.input_topics();
            consume(name, &inputs, handler, config, s, shutdown).await
        }
    }
}

/// Runs `handler` as stage `name` over `inputs` on the stage runtime, under a watchdog: an
/// instance found wedged is drained and joins its group again, as often as it takes.
async fn consume<H: Handler>(
    name: &str,
    inputs: &[String],
    handler: H,
    config: &MediaflowConfig,
    s: &Services,
    shutdown: CancellationToken,
) -> Result<Stopped> {
    // The consumer group is the stage name under the topic prefix, so test runs never share one.
    let group = format!("{}{name}", config.bus.topic_prefix);
    let handler = Arc::new(handler);
    let dead_letters = DeadLetters {
        publisher: Arc::new(s.bus.publisher(&format!("/mediaflow/{name}"))?),
        topic: s.bus.topics().dead_letters(),
    };
    loop {
        let probe = StageProbe::new();
        let watch = tokio::spawn(watch_stage(
            name.to_owned(),
            group.clone(),
            inputs.to_vec(),
            probe.clone(),
            config.stages.stall_timeout(),
            s.bus.clone(),
            s.metrics.clone(),
        ));
        let run = StageRun {
            name: name.to_owned(),
            handler: handler.clone(),
            dead_letters: dead_letters.clone(),
            options: config.stages.options(),
            metrics: s.metrics.clone(),
            probe: probe.clone(),
        };
        let stopped = mediaflow_runtime::run_stage(
            run,
            |listener| {
                s.bus
                    .consumer_with(&group, inputs, StartFrom::Earliest, listener)
            },
            shutdown.clone(),
        )
        .await;
        watch.abort();
        if probe.rejoin_requested() && !shutdown.is_cancelled() {
            // A consumer in a bad state may also fail to close; the new one starts clean.
            if let Err(e) = stopped {
                tracing::warn!(stage = name, error = %e, "the wedged consumer did not close cleanly");
            }
            tracing::info!(stage = name, "joining the consumer group again");
            continue;
        }
        return Ok(stopped?);
    }
}

/// How often a stage's consumer lag is measured and its watchdog looks: every 5 s, or more
/// often when the stall timeout is short.
fn watch_interval(stall_timeout: Duration) -> Duration {
    (stall_timeout / 3).clamp(Duration::from_millis(200), Duration::from_secs(5))
}

/// Measures the stage's consumer lag (messages on its inputs not yet committed) as a metric and
/// judges it with the watchdog until aborted. A wedged stage is logged, counted, named by
/// readiness and asked to rejoin its group; readiness clears once it is seen healthy again.
async fn watch_stage(
    stage: String,
    group: String,
    inputs: Vec<String>,
    probe: StageProbe,
    stall_timeout: Duration,
    bus: Bus,
    metrics: Metrics,
) {
    let mut watchdog = Watchdog::new(stall_timeout);
    let mut tick = tokio::time::interval(watch_interval(stall_timeout));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The watchdog is blind while positions cannot be read: said once, not at every tick.
    let mut blind = false;
    loop {
        tick.tick().await;
        let positions = match bus.group_positions(&group, &inputs).await {
            Ok(p) => {
                if std::mem::take(&mut blind) {
                    tracing::info!(stage, "consumer lag can be measured again");
                }
                p
            }
            Err(e) if !blind => {
                blind = true;
                tracing::warn!(stage, error = %e, "cannot measure consumer lag; the stage's watchdog waits until it can");
                continue;
            }
            Err(_) => continue,
        };
        metrics.consumer_lag(&stage, positions.iter().map(|p| p.lag()).sum());
        // No consumer yet (joining) or none any more: nothing to judge.
        let Some((held, in_flight)) = probe.held_and_in_flight() else {
            continue;
        };
        let seen = Observation {
            held,
            in_flight,
            positions,
        };
        match watchdog.observe(std::time::Instant::now(), &seen) {
            Verdict::Healthy => metrics.stage_unwedged(&stage),
            Verdict::Suspect => {}
            Verdict::Wedged(reason) => {
                tracing::error!(
                    stage,
                    group,
                    reason,
                    "stage wedged; making it rejoin its consumer group"
                );
                metrics.stage_wedged(&stage, &reason);
                probe.request_rejoin();
                return;
            }
        }
    }
}

/// Backoff before the first restart of a failed stage; doubles per failure in a row.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);
/// Longest backoff between restarts.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(60);
/// A stage that ran this long before failing counts as healthy: its next restart is quick again.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Runs `stage` under `mediaflow up` until `shutdown`, as an orchestrator would: when it fails
/// (returns an error or panics) it is restarted after a backoff that doubles with each failure in
/// a row, while the rest of the platform keeps running.
async fn supervise(
    stage: String,
    config: MediaflowConfig,
    services: Arc<Services>,
    shutdown: CancellationToken,
) {
    let mut failures: u32 = 0;
    loop {
        let started = std::time::Instant::now();
        let run = {
            let (stage, config, services, token) = (
                stage.clone(),
                config.clone(),
                services.clone(),
                shutdown.clone(),
            );
            tokio::spawn(async move { run_stage_with(&stage, &config, &services, token).await })
        };
        let error = match run.await {
            Ok(Ok(Stopped::Drained)) => return,
            Ok(Ok(Stopped::HandedBack { messages })) => {
                tracing::warn!(stage, messages, "handed back unfinished messages");
                return;
            }
            Ok(Err(e)) => format!("{e:#}"),
            Err(e) if e.is_panic() => format!("panicked: {}", panic_text(e.into_panic())),
            Err(e) => format!("{e}"),
        };
        if shutdown.is_cancelled() {
            tracing::error!(stage, error, "stage failed while stopping");
            return;
        }
        if started.elapsed() >= HEALTHY_RUN {
            failures = 0;
        }
        let wait = RESTART_BACKOFF
            .saturating_mul(1 << failures.min(6))
            .min(MAX_RESTART_BACKOFF);
        failures += 1;
        tracing::error!(stage, error, failures, restart_in = ?wait, "stage failed; restarting it");
        services.metrics.stage_restarted(&stage);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    match panic.downcast::<String>() {
        Ok(s) => *s,
        Err(panic) => panic
            .downcast_ref::<&str>()
            .map_or_else(|| "unknown panic".to_owned(), |s| (*s).to_owned()),
    }
}

/// The first failure of a part of the platform; recording it stops the platform.
#[derive(Clone)]
struct Failure {
    first: Arc<std::sync::Mutex<Option<String>>>,
    shutdown: CancellationToken,
}

impl Failure {
    fn new(shutdown: CancellationToken) -> Self {
        Self {
            first: Default::default(),
            shutdown,
        }
    }

    fn record(&self, what: String) {
        tracing::error!(error = %what, "stopping the platform");
        let mut first = self
            .first
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        first.get_or_insert(what);
        self.shutdown.cancel();
    }

    fn take(&self) -> Option<String> {
        self.first
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

impl Platform {
    /// Starts everything `config` asks for: embedded infrastructure, the gateway and every stage.
    pub async fn start(mut config: MediaflowConfig) -> Result<Self> {
        check_stages(&config)?;
        let enabled = config.stages.enabled.clone();
        let (kafka, s3) = start_infrastructure(&mut config).await?;
        if kafka.is_some() && config.bus.group_instance_id.is_none() {
            // The embedded broker serves this platform alone, so its stages keep one identity
            // across restarts (static group membership): a restarted `up` takes its partitions
            // back at once, instead of waiting for the broker to give up on members from before
            // a crash. With an external broker, set `bus.group_instance_id` per process.
            config.bus.group_instance_id = Some("up".into());
        }
        let services = Arc::new(connect(&config, Metrics::new()).await?);

        let listener = bind_gateway(&config).await?;
        let gateway_addr = listener.local_addr()?;

        let shutdown = CancellationToken::new();
        let failure = Failure::new(shutdown.clone());
        let tasks = TaskTracker::new();
        {
            let (services, config, token) = (services.clone(), config.clone(), shutdown.clone());
            let failure = failure.clone();
            tasks.spawn(async move {
                if let Err(e) = serve_gateway(&config, &services, listener, token).await {
                    failure.record(format!("gateway failed: {e:#}"));
                }
            });
        }
        let running = stages(&config)
            .into_iter()
            .filter(|s| enabled.as_ref().is_none_or(|e| e.contains(s)));
        for stage in running {
            tasks.spawn(supervise(
                stage,
                config.clone(),
                services.clone(),
                shutdown.clone(),
            ));
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
            shutdown,
            failure,
            tasks,
            kafka,
            _s3: s3,
        })
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
        self.shutdown.cancel();
        let drained = tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_ok();
        if let Some(kafka) = self.kafka {
            kafka.stop().await;
        }
        if let Some(failure) = self.failure.take() {
            bail!("{failure}");
        }
        if !drained {
            bail!("stages did not drain within {deadline:?}");
        }
        Ok(())
    }

    /// Waits until the platform is stopped (by its token or a failed part).
    pub async fn stopped(&self) {
        self.shutdown.cancelled().await;
    }
}
