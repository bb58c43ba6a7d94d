//! The platform's configuration: one section per service, layered defaults -> TOML file ->
//! environment (`MEDIAFLOW__SECTION__KEY`, and `DATABASE_URL`).

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use mediaflow_bus::BusConfig;
use mediaflow_db::DbConfig;
use mediaflow_gateway::GatewayConfig;
use mediaflow_image_worker::ImageWorkerConfig;
use mediaflow_store::StoreConfig;
use mediaflow_video_worker::VideoWorkerConfig;
use serde::{Deserialize, Serialize};

/// Everything `mediaflow` can be told.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaflowConfig {
    /// Folder for all local state: the embedded broker's and S3 server's data, the SQLite
    /// database, spooled uploads.
    pub data_dir: PathBuf,
    /// `pretty` for terminals, `json` for log collectors.
    pub log_format: LogFormat,
    /// Which infrastructure `mediaflow up` starts itself.
    pub embedded: EmbeddedConfig,
    /// Kafka connection.
    pub bus: BusConfig,
    /// Object storage connection.
    pub store: StoreConfig,
    /// Database connection.
    pub database: DbConfig,
    /// The REST gateway.
    pub gateway: GatewayConfig,
    /// The admin endpoints (`/healthz`, `/readyz`, `/metrics`) of `mediaflow run <stage>`; under
    /// `mediaflow up` and `run gateway` the gateway serves them.
    pub admin: AdminConfig,
    /// The pipeline files (YAML) declaring topics and stages: one path or a list, run together.
    /// Unset: the shipped `pipelines/default.yaml` (uploads), `pipelines/signup.yaml` (the
    /// sign-up flow) and `pipelines/tagging.yaml` (batches: detect, blur, join, reduce).
    pub pipeline: Option<Pipelines>,
    /// Settings of `image` stages that give none in the pipeline file.
    pub image_worker: ImageWorkerConfig,
    /// Settings of `video` stages that give none in the pipeline file.
    pub video_worker: VideoWorkerConfig,
    /// Exec stages added to the pipeline: a command run per item (`[[exec]]` tables). Each
    /// reads its `input_topic`; its results go to `items.processed` for work items, else
    /// `media.processed`.
    pub exec: Vec<mediaflow_exec_worker::ExecWorkerConfig>,
    /// Sources polling servers that speak the book's `/api/v1/items` contract
    /// (`[[http_source]]` tables).
    pub http_source: Vec<crate::http_source::HttpSourceConfig>,
    /// How every stage runs: concurrency, retries, dead letters, draining.
    pub stages: StagesConfig,
    /// The SMTP relay of the sign-up flow's mail.
    pub mail: mediaflow_signup::MailConfig,
    /// How sign-ups are taken and verified.
    pub signup: mediaflow_users::SignupConfig,
}

/// One pipeline file or several.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Pipelines {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

impl From<PathBuf> for Pipelines {
    fn from(path: PathBuf) -> Self {
        Pipelines::One(path)
    }
}

impl Pipelines {
    pub fn files(&self) -> &[PathBuf] {
        match self {
            Pipelines::One(p) => std::slice::from_ref(p),
            Pipelines::Many(v) => v,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

/// Where a stage process serves its admin endpoints.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin HTTP server.
    pub listen: std::net::SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// Embedded infrastructure switches. With a switch off, the matching section (`bus`, `store`)
/// must point at a running service.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// Start the embedded Kafka-compatible broker (nisshi) as a child process and use it.
    pub kafka: bool,
    /// Port of the embedded broker on 127.0.0.1 (0: any free port).
    pub kafka_port: u16,
    /// Path of the broker binary (`nisshi`); searched in `$PATH` and `~/.cargo/bin` when unset.
    #[serde(alias = "tansu_bin")]
    pub broker_bin: Option<PathBuf>,
    /// Serve S3 from `<data_dir>/s3` in process and use it.
    pub s3: bool,
    /// Port of the embedded S3 server on 127.0.0.1 (0: any free port).
    pub s3_port: u16,
    /// Start an SMTP sink that keeps every mail in `<data_dir>/mail` (see `mediaflow mail`)
    /// and send through it, unless `mail.host` names a relay.
    pub smtp: bool,
    /// Port of the embedded SMTP sink on 127.0.0.1 (0: any free port).
    pub smtp_port: u16,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self {
            kafka: true,
            kafka_port: 19092,
            broker_bin: None,
            s3: true,
            s3_port: 19000,
            smtp: true,
            smtp_port: 19025,
        }
    }
}

/// How every stage runs: concurrency, retries, dead letters, draining.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StagesConfig {
    /// The stages `mediaflow up` runs beside the gateway; all of them when unset. Stages left
    /// out can run as their own processes (`mediaflow run <stage>`).
    pub enabled: Option<Vec<String>>,
    /// Messages each stage instance has in flight at once; with `adaptive_concurrency`, the
    /// most.
    pub concurrency: usize,
    /// Size each stage's in-flight limit from its measured latency, between 2 and
    /// `concurrency`: up while more in flight finish as fast (waits on the broker, store or
    /// database overlap), down when they queue for the cores. A stage with its own
    /// `concurrency` in the pipeline file keeps that number.
    pub adaptive_concurrency: bool,
    /// Attempts at a message that keeps failing transiently (a dependency down) before it goes
    /// to the dead-letter topic. Permanent failures and bad input go there at once.
    pub max_attempts: u32,
    /// First backoff between attempts, in milliseconds; doubles per attempt, with jitter.
    pub initial_backoff_ms: u64,
    /// Longest backoff, in milliseconds.
    pub max_backoff_ms: u64,
    /// On shutdown, seconds messages being handled may take to finish before they are handed
    /// back uncommitted.
    pub drain_deadline_secs: u64,
    /// Seconds a stage instance may look wedged before its watchdog acts: messages wait on its
    /// input and none is committed, while it holds no partitions or has nothing in flight. It
    /// is then logged, counted (`mediaflow_stage_stalls_total`), named by `/readyz`, and made to
    /// leave and rejoin its consumer group.
    pub stall_timeout_secs: u64,
    /// Seconds a join's or reducer's relay holds an emission while it publishes it. After a
    /// crash, the next relay waits this long, then reads the topic to learn whether the send
    /// landed: keep it above the publisher's delivery timeout (`bus.request_timeout_ms`).
    pub emission_lease_secs: u64,
}

impl Default for StagesConfig {
    fn default() -> Self {
        let o = mediaflow_runtime::StageOptions::default();
        Self {
            enabled: None,
            concurrency: 32,
            adaptive_concurrency: true,
            max_attempts: o.max_attempts,
            initial_backoff_ms: o.retry.initial_backoff.as_millis() as u64,
            max_backoff_ms: o.retry.max_backoff.as_millis() as u64,
            drain_deadline_secs: o.drain_deadline.as_secs(),
            stall_timeout_secs: 30,
            emission_lease_secs: 45,
        }
    }
}

impl StagesConfig {
    pub fn stall_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.stall_timeout_secs.max(1))
    }

    pub fn options(&self) -> mediaflow_runtime::StageOptions {
        mediaflow_runtime::StageOptions {
            concurrency: self.concurrency.max(1),
            adaptive: self.adaptive_concurrency,
            max_attempts: self.max_attempts.max(1),
            retry: mediaflow_runtime::RetryPolicy {
                initial_backoff: std::time::Duration::from_millis(self.initial_backoff_ms),
                max_backoff: std::time::Duration::from_millis(self.max_backoff_ms),
            },
            drain_deadline: std::time::Duration::from_secs(self.drain_deadline_secs),
        }
    }
}

impl MediaflowConfig {
    /// Loads defaults, then `file` (if given), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, Box<figment::Error>> {
        let mut figment = Figment::from(Serialized::defaults(Self::with_defaults()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment = figment.merge(Env::prefixed("MEDIAFLOW__").split("__"));
        if let Ok(url) = std::env::var("DATABASE_URL") {
            figment = figment.merge(Serialized::default("database.url", url));
        }
        figment.extract().map_err(Box::new)
    }

    /// The defaults, with the data folder in the working directory.
    pub fn with_defaults() -> Self {
        Self {
            data_dir: PathBuf::from("mediaflow-data"),
            ..Self::default()
        }
    }

    /// The database URL in effect: the configured one, else SQLite in the data folder.
    pub fn database_url(&self) -> String {
        if self.database.url.is_empty() {
            format!("sqlite://{}", self.data_dir.join("mediaflow.db").display())
        } else {
            self.database.url.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_layers_over_defaults_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mediaflow.toml");
        std::fs::write(&file, "[gateway]\nmax_upload_bytes = 1000\n").unwrap();
        let cfg = MediaflowConfig::load(Some(&file)).unwrap();
        assert_eq!(cfg.gateway.max_upload_bytes, 1000);
        assert_eq!(cfg.image_worker.renditions[0].width, 256);

        std::fs::write(&file, "[gateway]\nmax_upload_byte = 1000\n").unwrap();
        let err = MediaflowConfig::load(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("max_upload_byte"), "{err}");
    }

    #[test]
    fn the_kubernetes_configuration_loads_and_its_renditions_check() {
        let file =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes/mediaflow.toml");
        let cfg = MediaflowConfig::load(Some(&file)).unwrap();
        assert!(!cfg.embedded.kafka && !cfg.embedded.s3);
        cfg.image_worker.check().unwrap();
        cfg.video_worker.check().unwrap();
        assert_eq!(cfg.video_worker.renditions.len(), 2);
        assert_eq!(
            cfg.video_worker.frames,
            mediaflow_video_worker::video::select::Strategy::Representative { count: 5 }
        );
        let names: Vec<&str> = cfg
            .image_worker
            .renditions
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(names, ["thumb-256", "card"]);
    }

    #[test]
    fn sqlite_in_the_data_folder_by_default() {
        let cfg = MediaflowConfig::with_defaults();
        assert_eq!(cfg.database_url(), "sqlite://mediaflow-data/mediaflow.db");
    }
}
