//! Starting the platform: embedded infrastructure (when configured), schema, topics and bucket,
//! then the gateway and every stage as tracked tasks under one cancellation token. Start-up of
//! the infrastructure is `infra`, a consuming stage under its watchdog is `watch`, restarts and
//! failures are `supervise`; what stays here is which stages there are and how each is run.

mod infra;
mod supervise;
mod watch;

use infra::{Services, connect, start_infrastructure};
use supervise::{Failure, supervise};
use watch::consume;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mediaflow_embedded::{EmbeddedKafka, EmbeddedS3};
use mediaflow_gateway::Gateway;
use mediaflow_image_worker::ImageWorker;
use mediaflow_router::Router;
use mediaflow_runtime::Stopped;
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
