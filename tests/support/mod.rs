//! Test harness: starts the platform on its own data folder, broker, bucket, topic prefix and
//! (for PostgreSQL) database, exactly as `mediaflow up` does, on ports picked by the OS.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mediaflow::{MediaflowConfig, Platform};
use mediaflow_bus::{Bus, BusConfig, StartFrom};

/// How a scenario's platform is deployed.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    /// As `mediaflow up` runs on one machine: embedded broker and S3 server, SQLite.
    Sqlite,
    /// As in production: Kafka and S3 run as separate services the platform is pointed at through
    /// configuration (`embedded.*` off), and the database is PostgreSQL.
    Postgres,
}

/// Kafka and S3 started by the test as external services, the way an operator runs them; the
/// test can take S3 down and bring it back on the same address and data.
struct External {
    kafka: Option<mediaflow_embedded::EmbeddedKafka>,
    kafka_port: u16,
    kafka_dir: PathBuf,
    s3: Option<mediaflow_embedded::EmbeddedS3>,
    s3_addr: SocketAddr,
    s3_root: PathBuf,
}

/// A platform started for one test.
pub struct TestPlatform {
    /// Drains the platform if the test ends without stopping it (a failed `?` or `ensure!`);
    /// first, so it is dropped before the platform and its embedded broker.
    guard: DrainOnDrop,
    pub platform: Platform,
    pub base: String,
    pub bus: Bus,
    pub config: MediaflowConfig,
    dir: tempfile::TempDir,
    external: Option<External>,
}

/// Makes a failed assertion in the test itself end the test process at once. Unwinding would
/// drop the running platform inside the test's runtime, whose consumers then wait out their
/// drain and close deadlines: the test would hang instead of failing. Panics on the platform's
/// own threads (tokio's, rayon's) are left to the stage runtime, which turns them into failures.
fn fail_fast() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            report(info);
            let thread = std::thread::current();
            let platform_thread = thread
                .name()
                .is_none_or(|n| n.starts_with("tokio-") || n.starts_with("rayon"));
            if !platform_thread {
                eprintln!("the test failed: ending its process now");
                // The stage processes it started would outlive it.
                let children = SPAWNED.lock().map(|c| c.clone()).unwrap_or_default();
                for pid in children {
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
                std::process::exit(101);
            }
        }));
    });
}

/// Drains a platform the test did not stop, so that a test ending in an error fails instead of
/// hanging: left running, its stages would be dropped with the test's runtime, and their
/// consumers would wait out drain and close deadlines.
struct DrainOnDrop(Option<mediaflow::Stopper>);

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        let Some(stopper) = self.0.take() else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
            eprintln!("the test ended without stopping its platform: draining it");
            tokio::task::block_in_place(|| {
                handle.block_on(stopper.drain(Duration::from_secs(30)));
            });
        }
    }
}

/// Processes `spawn_stage` started, killed by `fail_fast`.
static SPAWNED: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// A small deterministic generator (xorshift) for crash schedules.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `MEDIAFLOW_CRASH_SEED`, else from the clock; the seed is printed, so a
    /// failing schedule can be replayed.
    pub fn seeded(what: &str) -> Self {
        let seed = std::env::var("MEDIAFLOW_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                u64::from(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .subsec_nanos(),
                ) | 1
            });
        eprintln!("{what} seed: {seed} (MEDIAFLOW_CRASH_SEED={seed} replays this schedule)");
        Self(seed)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The value of metric line `series` on `base`'s `/metrics`, 0 if absent.
pub async fn metric_at(base: &str, series: &str) -> Result<f64> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0))
}

/// Where `./x` keeps what it installs: `$MEDIAFLOW_CACHE`, else `~/.cache/mediaflow`.
fn cache_dir() -> PathBuf {
    std::env::var_os("MEDIAFLOW_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/mediaflow")
        })
}

/// A file of the repository, by its path from the root.
pub fn repo_file(path: &str) -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// Runs the upload pipeline and the tagging pipeline (batches) together.
pub fn with_tagging(c: &mut MediaflowConfig) {
    c.pipeline = Some(mediaflow::config::Pipelines::Many(vec![
        repo_file("pipelines/default.yaml"),
        repo_file("pipelines/tagging.yaml"),
    ]));
}

/// The folder of real sample media extracted by `./x` (photos from scikit-image's wheel).
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("MEDIAFLOW_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("fixtures"));
    assert!(
        dir.join("rocket.jpg").is_file(),
        "real media fixtures are missing in {}: run the tests through `./x test`, which fetches them",
        dir.display()
    );
    dir
}

/// The `mediaflow` binary cargo built beside this test.
pub fn mediaflow_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory");
    let bin = dir.join("mediaflow");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build -p mediaflow`",
        bin.display()
    );
    bin
}

/// An exec stage named `name` running `script` on `jobs.image`, with test-sized limits.
pub fn exec_stage(name: &str, script: &std::path::Path) -> mediaflow_exec_worker::ExecWorkerConfig {
    mediaflow_exec_worker::ExecWorkerConfig {
        name: name.into(),
        command: vec![script.display().to_string()],
        input_topic: "jobs.image".into(),
        version: "1".into(),
        timeout_secs: 30,
        max_input_bytes: 1 << 24,
        max_outputs: 10,
        max_output_bytes: 1 << 20,
    }
}

/// The Python interpreter that has kafka-python installed (`./x` sets it up).
pub fn python() -> PathBuf {
    let p = std::env::var_os("MEDIAFLOW_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("venv/bin/python"));
    assert!(
        p.is_file(),
        "no Python with kafka-python at {}: run the tests through `./x test`",
        p.display()
    );
    p
}

/// Runs `tests/py/SCRIPT` with `args` on `python()`; its standard output, or an error with its
/// standard error if it failed.
pub async fn run_py<I, A>(script: &str, args: I) -> Result<Vec<u8>>
where
    I: IntoIterator<Item = A>,
    A: AsRef<std::ffi::OsStr>,
{
    let out = tokio::process::Command::new(python())
        .arg(repo_file("tests/py").join(script))
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {script}"))?;
    if !out.status.success() {
        bail!("{script}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Creates a fresh PostgreSQL database for one test and returns its URL.
pub async fn scratch_postgres() -> Result<String> {
    let name = unique("mediaflow_test_");
    postgres_admin(&format!("CREATE DATABASE {name}")).await?;
    Ok(format!("{}/{name}", postgres_server()))
}

/// The PostgreSQL server tests use: `MEDIAFLOW_TEST_POSTGRES`, else the local one.
fn postgres_server() -> String {
    std::env::var("MEDIAFLOW_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

async fn postgres_admin(statement: &str) -> Result<()> {
    use sqlx::Connection;
    let server = postgres_server();
    let mut conn = sqlx::PgConnection::connect(&format!("{server}/postgres"))
        .await
        .with_context(|| format!("connecting to PostgreSQL at {server} (is it running?)"))?;
    sqlx::query(statement).execute(&mut conn).await?;
    Ok(())
}

impl TestPlatform {
    pub async fn start(backend: Backend) -> Result<Self> {
        Self::start_with(backend, |_| {}).await
    }

    pub async fn start_with(
        backend: Backend,
        adjust: impl FnOnce(&mut MediaflowConfig),
    ) -> Result<Self> {
        Self::start_registry(backend, mediaflow::Registry::default(), adjust).await
    }

    /// A platform whose stage kinds come from `registry` (one's own kinds added).
    pub async fn start_registry(
        backend: Backend,
        registry: mediaflow::Registry,
        adjust: impl FnOnce(&mut MediaflowConfig),
    ) -> Result<Self> {
        mediaflow_telemetry::init_logging(mediaflow_telemetry::LogFormat::Pretty);
        fail_fast();
        let dir = tempfile::tempdir()?;
        let mut config = MediaflowConfig::with_defaults();
        config.data_dir = dir.path().join("data");
        config.gateway.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.bus.topic_prefix = format!("{}.", unique("t"));
        config.store.bucket = unique("mf-");
        config.stages.initial_backoff_ms = 50;
        // The upload pipeline alone unless a test says otherwise: the sign-up flow's tests run
        // `pipelines/signup.yaml` against an SMTP server of their own.
        config.pipeline = Some(repo_file("pipelines/default.yaml").into());
        config.embedded.smtp = false;
        let external = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                config.database.url = scratch_postgres().await?;
                let broker = mediaflow_embedded::find_broker(None)?;
                // A free port can be taken by a parallel test before the broker binds it.
                let mut attempts = 0;
                let (kafka, port) = loop {
                    let port = mediaflow_embedded::free_port()?;
                    let kafka_dir = dir.path().join("kafka-service");
                    match mediaflow_embedded::EmbeddedKafka::start(&broker, &kafka_dir, port).await
                    {
                        Ok(kafka) => break (kafka, port),
                        Err(_) if attempts < 3 => attempts += 1,
                        Err(e) => return Err(e.into()),
                    }
                };
                let s3 = mediaflow_embedded::EmbeddedS3::start(
                    &dir.path().join("s3-service"),
                    SocketAddr::from(([127, 0, 0, 1], 0)),
                    &config.store.access_key,
                    &config.store.secret_key,
                )
                .await?;
                config.embedded.kafka = false;
                config.embedded.s3 = false;
                config.bus.brokers = kafka.bootstrap().to_owned();
                config.store.endpoint = s3.endpoint();
                Some(External {
                    kafka_port: port,
                    kafka: Some(kafka),
                    kafka_dir: dir.path().join("kafka-service"),
                    s3_addr: s3.addr(),
                    s3: Some(s3),
                    s3_root: dir.path().join("s3-service"),
                })
            }
        };
        adjust(&mut config);
        let mut tp = Self::launch(config, dir, registry).await?;
        tp.external = external;
        Ok(tp)
    }

    /// Starts a platform on an existing configuration and data folder.
    pub async fn restart(config: MediaflowConfig, dir: tempfile::TempDir) -> Result<Self> {
        Self::launch(config, dir, mediaflow::Registry::default()).await
    }

    async fn launch(
        mut config: MediaflowConfig,
        dir: tempfile::TempDir,
        registry: mediaflow::Registry,
    ) -> Result<Self> {
        config.embedded.kafka_port = 0;
        config.embedded.s3_port = 0;
        config.embedded.smtp_port = 0;
        let platform = Platform::start_with(config.clone(), registry).await?;
        let base = platform.endpoints.gateway.clone();
        let bus = Bus::new(BusConfig {
            brokers: platform.endpoints.kafka.clone(),
            ..config.bus.clone()
        });
        config.bus.brokers = platform.endpoints.kafka.clone();
        config.store.endpoint = platform.endpoints.s3.clone();
        Ok(Self {
            guard: DrainOnDrop(Some(platform.stopper())),
            platform,
            base,
            bus,
            config,
            dir,
            external: None,
        })
    }

    /// An aws-sdk-s3 client for the platform's S3 server, configured independently of the
    /// platform's own store crate.
    pub fn s3_client(&self) -> aws_sdk_s3::Client {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .endpoint_url(&self.platform.endpoints.s3)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                &self.config.store.access_key,
                &self.config.store.secret_key,
                None,
                None,
                "test",
            ))
            .force_path_style(true)
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    /// Every object key in the platform's bucket.
    pub async fn object_keys(&self) -> Result<Vec<String>> {
        let out = self
            .s3_client()
            .list_objects_v2()
            .bucket(&self.config.store.bucket)
            .send()
            .await?;
        Ok(out
            .contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_owned))
            .collect())
    }

    /// Reads events from `topic` (without prefix) with rdkafka until `count` arrived.
    pub async fn read_events(
        &self,
        topic: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<cloudevents::Event>> {
        let topic = format!("{}{topic}", self.config.bus.topic_prefix);
        let consumer = self.bus.consumer(
            &unique("reader-"),
            std::slice::from_ref(&topic),
            StartFrom::Earliest,
        )?;
        let deadline = Instant::now() + timeout;
        let mut events = Vec::new();
        while events.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(delivery) = tokio::time::timeout(left, consumer.recv()).await else {
                bail!(
                    "only {} of {count} events arrived on {topic} within {timeout:?}",
                    events.len()
                );
            };
            let delivery = delivery?;
            events.push(delivery.event.map_err(anyhow::Error::msg)?);
        }
        consumer.close()?;
        Ok(events)
    }

    /// Every event retained on `topic` (without prefix) now, in partition order; fails if a
    /// message is not a CloudEvent.
    pub async fn events(&self, topic: &str) -> Result<Vec<cloudevents::Event>> {
        let topic = format!("{}{topic}", self.config.bus.topic_prefix);
        self.bus
            .read_to_end(&topic)
            .await?
            .into_iter()
            .map(|d| d.event.map_err(anyhow::Error::msg))
            .collect()
    }

    /// Every event retained on `topic` (without prefix) now, decoded as `T`; fails if one is not.
    pub async fn decoded<T: mediaflow_events::EventData>(&self, topic: &str) -> Result<Vec<T>> {
        self.events(topic)
            .await?
            .iter()
            .map(|e| mediaflow_events::decode(e).map_err(anyhow::Error::from))
            .collect()
    }

    /// Records rocket.jpg as a queued upload the way the gateway does, storing its object only
    /// if `store_object`, and returns the `media.uploaded` event without publishing it: tests
    /// decide what the world looks like before the pipeline sees it.
    pub async fn seed_upload(&self, store_object: bool) -> Result<mediaflow_events::MediaUploaded> {
        let bytes = std::fs::read(fixtures().join("rocket.jpg"))?;
        self.seed_media(&bytes, "image/jpeg", "jpg", store_object)
            .await
    }

    /// Records `bytes` as a queued upload of `content_type` (a video if it is `video/...`, else
    /// an image), storing the object if `store_object`, and returns its `media.uploaded` event
    /// unpublished. Unlike the gateway it
    /// checks nothing: the stage gets exactly these bytes.
    pub async fn seed_media(
        &self,
        bytes: &[u8],
        content_type: &str,
        ext: &str,
        store_object: bool,
    ) -> Result<mediaflow_events::MediaUploaded> {
        use sha2::Digest;
        let id = uuid::Uuid::now_v7().to_string();
        let kind = if content_type.starts_with("video/") {
            mediaflow_events::MediaKind::Video
        } else {
            mediaflow_events::MediaKind::Image
        };
        let object = mediaflow_events::ObjectRef {
            bucket: self.config.store.bucket.clone(),
            key: format!("uploads/{id}/original.{ext}"),
            size: bytes.len() as u64,
            sha256: format!("{:x}", sha2::Sha256::digest(bytes)),
            content_type: content_type.into(),
        };
        if store_object {
            self.s3_client()
                .put_object()
                .bucket(&object.bucket)
                .key(&object.key)
                .body(bytes.to_vec().into())
                .send()
                .await?;
        }
        let db = mediaflow_db::Db::connect(&self.config.database_url(), 1).await?;
        let now = mediaflow_db::Db::now_ms();
        let row = mediaflow_db::MediaRow {
            id: id.clone(),
            kind: kind.as_str().into(),
            content_type: object.content_type.clone(),
            filename: None,
            bucket: object.bucket.clone(),
            object_key: object.key.clone(),
            size_bytes: object.size as i64,
            sha256: object.sha256.clone(),
            status: mediaflow_db::MediaStatus::Queued,
            error: None,
            created_at_ms: now,
            updated_at_ms: now,
        };
        let uploaded = mediaflow_events::MediaUploaded {
            media_id: id,
            kind,
            object,
            filename: None,
            uploaded_at: "2026-11-24T00:00:00Z".into(),
            batch: None,
        };
        db.insert_media(&row, &mediaflow_events::EventData::id(&uploaded), &[])
            .await?;
        Ok(uploaded)
    }

    /// Publishes `event` on `media.uploaded` as the gateway would.
    pub async fn announce(&self, event: &mediaflow_events::MediaUploaded) -> Result<()> {
        let topic = format!("{}media.uploaded", self.config.bus.topic_prefix);
        self.bus.publisher("/test")?.publish(&topic, event).await?;
        Ok(())
    }

    /// A `mediaflow run image-worker` process (worker `n`) against this platform's services, as
    /// an orchestrator runs it; its log goes to `<dir>/worker-<n>.log`.
    pub fn spawn_image_worker(
        &self,
        n: usize,
        dir: &std::path::Path,
    ) -> Result<tokio::process::Child> {
        // Static membership: a restarted worker takes over its killed predecessor's
        // partitions at once.
        self.spawn_stage(
            "image-worker",
            &format!("worker-{n}"),
            dir,
            &[("MEDIAFLOW__BUS__GROUP_INSTANCE_ID", &format!("worker-{n}"))],
        )
    }

    /// A `mediaflow run <stage>` process against this platform's services, as an orchestrator
    /// runs it, with `env` on top; its log goes to `<dir>/<name>.log`.
    pub fn spawn_stage(
        &self,
        stage: &str,
        name: &str,
        dir: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Result<tokio::process::Child> {
        let c = &self.config;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{name}.log")))?;
        let mut command = tokio::process::Command::new(mediaflow_bin());
        if let Some(pipeline) = &c.pipeline {
            let files: Vec<String> = pipeline
                .files()
                .iter()
                .map(|f| format!("{:?}", f.display().to_string()))
                .collect();
            command.env("MEDIAFLOW__PIPELINE", format!("[{}]", files.join(", ")));
        }
        if !c.signup.code_key.is_empty() {
            command.env("MEDIAFLOW__SIGNUP__CODE_KEY", &c.signup.code_key);
        }
        if !c.mail.host.is_empty() {
            command
                .env("MEDIAFLOW__MAIL__HOST", &c.mail.host)
                .env("MEDIAFLOW__MAIL__PORT", c.mail.port.to_string());
        }
        command
            .args(["run", stage])
            .env("MEDIAFLOW__EMBEDDED__KAFKA", "false")
            .env("MEDIAFLOW__EMBEDDED__S3", "false")
            .env("MEDIAFLOW__BUS__BROKERS", &c.bus.brokers)
            .env("MEDIAFLOW__BUS__TOPIC_PREFIX", &c.bus.topic_prefix)
            .env("MEDIAFLOW__BUS__PARTITIONS", c.bus.partitions().to_string())
            .env("MEDIAFLOW__STORE__ENDPOINT", &c.store.endpoint)
            .env("MEDIAFLOW__STORE__BUCKET", &c.store.bucket)
            .env("MEDIAFLOW__ADMIN__LISTEN", "127.0.0.1:0")
            .env("MEDIAFLOW__DATA_DIR", dir)
            .env("MEDIAFLOW__STAGES__INITIAL_BACKOFF_MS", "50")
            .env("DATABASE_URL", c.database_url())
            .env("RUST_LOG", "info,librdkafka=warn")
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .inspect(|child| {
                if let (Some(pid), Ok(mut spawned)) = (child.id(), SPAWNED.lock()) {
                    spawned.push(pid);
                }
            })
            .with_context(|| format!("starting a {stage} process"))
    }

    /// Publishes JSON events on `topic` (without prefix) as an outside producer would: event
    /// `(id, subject, data)` of type `type_`, keyed by its subject, all acknowledged.
    pub async fn publish_json(
        &self,
        topic: &str,
        type_: &str,
        events: &[(String, String, serde_json::Value)],
    ) -> Result<()> {
        use cloudevents::{EventBuilder, EventBuilderV10};
        let topic = format!("{}{topic}", self.config.bus.topic_prefix);
        let publisher = self.bus.publisher("/test")?;
        for chunk in events.chunks(500) {
            let sends = chunk.iter().map(|(id, subject, data)| {
                let event = EventBuilderV10::new()
                    .id(id)
                    .ty(type_)
                    .source("/test")
                    .subject(subject)
                    .data("application/json", data.clone())
                    .build();
                let (publisher, topic) = (&publisher, &topic);
                async move {
                    publisher
                        .publish_event(topic, subject, event.map_err(anyhow::Error::msg)?)
                        .await?;
                    anyhow::Ok(())
                }
            });
            for sent in futures::future::join_all(sends).await {
                sent?;
            }
        }
        Ok(())
    }

    /// Reads `count` events of `topic` (without prefix) with kafka-python, an independent
    /// client: one JSON object per message (`key`, `headers`, `data`).
    pub async fn read_with_kafka_python(
        &self,
        topic: &str,
        count: usize,
    ) -> Result<Vec<serde_json::Value>> {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("py/read_topic.py");
        let out = tokio::process::Command::new(python())
            .arg(script)
            .arg(&self.config.bus.brokers)
            .arg(format!("{}{topic}", self.config.bus.topic_prefix))
            .arg(count.to_string())
            .arg("60")
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "kafka-python read of {topic} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8(out.stdout)?
            .lines()
            .map(|l| serde_json::from_str(l).map_err(anyhow::Error::from))
            .collect()
    }

    /// Stops the external Kafka broker (production-like platforms only).
    pub async fn stop_kafka(&mut self) {
        let external = self.external.as_mut().expect("an external broker");
        if let Some(kafka) = external.kafka.take() {
            kafka.stop().await;
        }
    }

    /// Starts the external broker again on the same port and data.
    pub async fn start_kafka(&mut self) -> Result<()> {
        let external = self.external.as_mut().expect("an external broker");
        let broker = mediaflow_embedded::find_broker(None)?;
        let kafka = mediaflow_embedded::EmbeddedKafka::start(
            &broker,
            &external.kafka_dir,
            external.kafka_port,
        )
        .await?;
        external.kafka = Some(kafka);
        Ok(())
    }

    /// Stops the external S3 server (production-like platforms only).
    pub fn stop_s3(&mut self) {
        let external = self.external.as_mut().expect("an external S3 server");
        drop(external.s3.take());
    }

    /// Starts the external S3 server again on the same address and data.
    pub async fn start_s3(&mut self) -> Result<()> {
        let external = self.external.as_mut().expect("an external S3 server");
        let s3 = mediaflow_embedded::EmbeddedS3::start(
            &external.s3_root,
            external.s3_addr,
            &self.config.store.access_key,
            &self.config.store.secret_key,
        )
        .await?;
        external.s3 = Some(s3);
        Ok(())
    }

    /// The value of a metric line on the gateway's `/metrics`, 0 if absent.
    pub async fn metric(&self, series: &str) -> Result<f64> {
        metric_at(&self.base, series).await
    }

    /// Waits until none of the media `ids` is `queued` any more (each done or failed), polling
    /// the database; the error names those still queued after `timeout`.
    pub async fn wait_final(&self, ids: &[&str], timeout: Duration) -> Result<()> {
        let db = mediaflow_db::Db::connect(&self.config.database_url(), 1).await?;
        let deadline = Instant::now() + timeout;
        loop {
            let mut queued = Vec::new();
            for id in ids {
                let media = db
                    .media(id)
                    .await?
                    .with_context(|| format!("no media {id}"))?;
                if media.status == mediaflow_db::MediaStatus::Queued {
                    queued.push(*id);
                }
            }
            if queued.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("still queued after {timeout:?}: {queued:?}");
            }
            // Polling the database for final statuses.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until stage `stage` has committed every message of `topic` (names without prefix).
    pub async fn wait_caught_up(&self, stage: &str, topic: &str) -> Result<()> {
        self.wait_caught_up_within(stage, topic, Duration::from_secs(60))
            .await
    }

    /// Waits up to `timeout` until stage `stage` has committed every message of `topic`.
    pub async fn wait_caught_up_within(
        &self,
        stage: &str,
        topic: &str,
        timeout: Duration,
    ) -> Result<()> {
        let prefix = &self.config.bus.topic_prefix;
        let (group, topic) = (format!("{prefix}{stage}"), format!("{prefix}{topic}"));
        let deadline = Instant::now() + timeout;
        loop {
            let lag = self.bus.group_lag(&group, &topic).await?;
            if lag == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{group} still lags {lag} messages behind on {topic}");
            }
            // Polling committed offsets; auto-commit runs every second.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the platform and drops its scratch database, if it had one.
    /// Waits until batch `id` is released by its join and its report is in; the batch as shown.
    pub async fn batch_reported(&self, id: &str, timeout: Duration) -> Result<serde_json::Value> {
        let start = Instant::now();
        loop {
            let shown: serde_json::Value = reqwest::get(format!("{}/v1/batches/{id}", self.base))
                .await?
                .json()
                .await?;
            if shown["state"] != "open" && !shown["report"].is_null() {
                return Ok(shown);
            }
            if start.elapsed() > timeout {
                bail!("batch {id} not reported after {timeout:?}: {shown}");
            }
            // Polling the API.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn stop(mut self) -> Result<()> {
        self.guard.0 = None;
        self.platform.stop(Duration::from_secs(30)).await?;
        let url = &self.config.database.url;
        if let Some(name) = url.strip_prefix(&format!("{}/", postgres_server())) {
            postgres_admin(&format!("DROP DATABASE {name} WITH (FORCE)")).await?;
        }
        Ok(())
    }

    /// Stops the platform and hands back what `restart` needs to start it again on the same data.
    pub async fn stop_keeping_data(mut self) -> Result<(MediaflowConfig, tempfile::TempDir)> {
        self.guard.0 = None;
        self.platform.stop(Duration::from_secs(30)).await?;
        Ok((self.config, self.dir))
    }
}
