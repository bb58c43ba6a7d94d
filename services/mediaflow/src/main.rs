//! The `mediaflow` command line: `up` runs the whole platform, `run` one stage, `tail` prints a
//! topic's events, `mail` shows the mail the embedded SMTP sink kept, `config` prints the
//! effective configuration.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mediaflow::{Endpoints, MediaflowConfig, Platform, config::LogFormat};
use mediaflow_bus::Bus;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "mediaflow",
    version,
    about = "Event-streaming media processing platform"
)]
struct Cli {
    /// TOML configuration file, layered over the defaults and under `MEDIAFLOW__*` variables.
    #[arg(long, short, global = true, env = "MEDIAFLOW_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start everything (embedded broker, S3 and SQLite unless configured otherwise), the gateway
    /// and every stage; serve until Ctrl-C or SIGTERM.
    Up {
        /// Upload every file in this folder once the platform is up, and print the results.
        #[arg(long)]
        samples: Option<PathBuf>,
        /// Exit after the samples are processed instead of serving on.
        #[arg(long, requires = "samples")]
        exit_after_samples: bool,
    },
    /// Run the gateway or one stage against the configured infrastructure (as a Kubernetes
    /// Deployment does).
    Run {
        /// `gateway`, or a stage of the pipeline (e.g. router, image-worker, video-worker), an
        /// `[[exec]]` stage or a source, by name.
        stage: String,
    },
    /// Print the events on a topic as JSON lines.
    Tail {
        /// Topic name without prefix, e.g. images.processed.
        topic: String,
        /// Start at the oldest retained event instead of the newest.
        #[arg(long)]
        from_beginning: bool,
        /// Stop after this many events.
        #[arg(long, short = 'n')]
        max: Option<u64>,
    },
    /// Admit every object under an S3 prefix into the pipeline, once (a source for old media).
    Backfill {
        /// s3://bucket/prefix on the configured S3 endpoint.
        location: String,
        /// Announce the objects admitted now as the items of a new batch of this name (its id
        /// is printed; `GET /v1/batches/{id}` follows it).
        #[arg(long)]
        batch: Option<String>,
        /// The batch's failure policy: `fail-batch` or `complete-partial`.
        #[arg(long, default_value = "fail-batch", requires = "batch")]
        failure_policy: String,
    },
    /// List or replay dead letters: messages stages gave up on.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Pipeline files: check one, or draw its topology.
    Pipeline {
        #[command(subcommand)]
        command: PipelineCommand,
    },
    /// List the mail the embedded SMTP sink of `mediaflow up` kept (in `<data_dir>/mail`), or
    /// print one.
    Mail {
        /// Print this mail (its id, as listed) in full instead.
        #[arg(long)]
        show: Option<String>,
    },
    /// Batches: a folder's or a zip archive's files as one batch.
    Batch {
        #[command(subcommand)]
        command: BatchCommand,
    },
    /// Print the effective configuration as TOML.
    Config,
}

#[derive(Subcommand)]
enum BatchCommand {
    /// Declare a batch whose manifest is the folder's (or zip archive's) files, upload them
    /// with a progress bar, and print the batch.
    Upload {
        /// A folder, whose regular, non-hidden files are the batch's items; or a zip archive,
        /// whose files are, by their base names (directories, hidden files and `__MACOSX/` left
        /// out).
        #[arg(value_name = "FOLDER|ARCHIVE.zip")]
        source: PathBuf,
        /// The batch's name (the folder's or archive's name when not given).
        #[arg(long)]
        name: Option<String>,
        /// What a failed item does to the batch.
        #[arg(long, default_value = "fail-batch", value_parser = ["fail-batch", "complete-partial"])]
        failure_policy: String,
        /// Uploads in flight at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Follow the batch until every item is done or failed (up to this many seconds).
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "3600")]
        wait: Option<u64>,
        /// The gateway (default: the running `mediaflow up`'s, else `gateway.listen`).
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(Subcommand)]
enum PipelineCommand {
    /// Check a pipeline file: every problem is printed with its line and column, and the exit
    /// status is 2 if there is one.
    Check {
        /// The pipeline file (YAML), e.g. pipelines/default.yaml.
        file: PathBuf,
    },
    /// Print the topology of a pipeline file: stages, the topics they read and the topics their
    /// ports write.
    Graph {
        /// The pipeline file (YAML).
        file: PathBuf,
        /// `text`, `dot` (Graphviz) or `mermaid`.
        #[arg(long, value_enum, default_value_t = GraphFormat::Text)]
        format: GraphFormat,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum GraphFormat {
    Text,
    Dot,
    Mermaid,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List the dead letters on the dead-letter topic.
    List {
        #[command(flatten)]
        filter: DlqFilter,
    },
    /// Publish matching dead letters again on the topic they came from, once each. Fix the
    /// cause first.
    Replay {
        #[command(flatten)]
        filter: DlqFilter,
    },
}

#[derive(clap::Args)]
struct DlqFilter {
    /// Only dead letters of this stage (router, image-worker, video-worker, ...).
    #[arg(long)]
    stage: Option<String>,
    /// Only dead letters of this error class (transient, permanent, bad_input).
    #[arg(long, value_parser = ["transient", "permanent", "bad_input"])]
    class: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match MediaflowConfig::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mediaflow: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    mediaflow_telemetry::init_logging(match config.log_format {
        LogFormat::Json => mediaflow_telemetry::LogFormat::Json,
        LogFormat::Pretty => mediaflow_telemetry::LogFormat::Pretty,
    });
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mediaflow: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mediaflow: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Cancels `token` on Ctrl-C, SIGTERM or SIGHUP (the terminal went away); a second one exits at
/// once (status 130), without waiting for the drain. The handlers are installed before this returns, so a signal that
/// arrives right after start-up still drains instead of killing the process.
fn cancel_on_signals(token: CancellationToken) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            _ = hup.recv() => {}
        }
        tracing::info!("signal received: draining (press Ctrl-C again to stop at once)");
        token.cancel();
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            _ = hup.recv() => {}
        }
        // Work not committed is delivered again after a restart; the embedded broker is told
        // to die with this process.
        eprintln!("mediaflow: second signal, stopping at once without draining");
        std::process::exit(EXIT_INTERRUPTED.into());
    });
    Ok(())
}

/// Exit status when a second signal cut the drain short (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: u8 = 130;

const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// Exit status of `run` when the drain deadline passed with messages unfinished.
const HANDED_BACK: u8 = 3;

async fn run(command: Command, config: MediaflowConfig) -> Result<ExitCode> {
    match command {
        Command::Up {
            samples,
            exit_after_samples,
        } => {
            let platform = Platform::start(config).await?;
            cancel_on_signals(platform.shutdown_token())?;
            let base = platform.endpoints.gateway.clone();
            println!("mediaflow is up");
            println!(
                "  gateway   {base}  (POST /v1/media, GET /v1/media/{{id}}, /metrics, /readyz)"
            );
            println!("  kafka     {}", platform.endpoints.kafka);
            println!(
                "  s3        {}  bucket {}",
                platform.endpoints.s3, platform.endpoints.bucket
            );
            println!("  database  {}", platform.endpoints.database);
            if !platform.endpoints.smtp.is_empty() {
                println!(
                    "  mail      smtp://{}  (POST /v1/users signs up; `mediaflow mail` lists the mail sent)",
                    platform.endpoints.smtp
                );
            }
            if let Some(dir) = samples {
                let files = mediaflow::samples::sample_files(&dir)?;
                let results = tokio::select! {
                    r = mediaflow::samples::upload_and_wait(&base, &files, Duration::from_secs(120)) => r,
                    () = platform.stopped() => Err(anyhow::anyhow!("the platform stopped before the samples finished")),
                };
                match results {
                    Ok(results) => mediaflow::samples::print_results(&base, &results),
                    Err(e) => {
                        platform.stop(DRAIN_DEADLINE).await?;
                        return Err(e);
                    }
                }
                // The photos again, as one batch: the tagging pipeline detects and blurs faces
                // and plates, joins each photo's branches and the batch, and reduces a report.
                let photos: Vec<_> = mediaflow::batch::batch_files(&dir)?
                    .into_iter()
                    .filter(|(name, _, _)| mediaflow::samples::is_photo(name))
                    .collect();
                if !photos.is_empty() {
                    println!("\nthe photos as one batch (`mediaflow batch upload`):");
                    let job = mediaflow::batch::BatchUpload {
                        base: base.clone(),
                        source: dir.clone(),
                        name: Some("samples".into()),
                        failure_policy: "complete-partial".into(),
                        concurrency: 4,
                        wait: Some(Duration::from_secs(120)),
                    };
                    let batch = tokio::select! {
                        r = mediaflow::batch::upload_files(&job, photos) => r,
                        () = platform.stopped() => Err(anyhow::anyhow!("the platform stopped before the batch finished")),
                    };
                    match batch {
                        Ok(batch) => print!("{}", mediaflow::batch::summary(&batch)),
                        Err(e) => {
                            platform.stop(DRAIN_DEADLINE).await?;
                            return Err(e);
                        }
                    }
                }
                if exit_after_samples {
                    platform.stop(DRAIN_DEADLINE).await?;
                    return Ok(ExitCode::SUCCESS);
                }
            }
            println!("\nserving until Ctrl-C");
            platform.stopped().await;
            platform.stop(DRAIN_DEADLINE).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { stage } => {
            let token = CancellationToken::new();
            cancel_on_signals(token.clone())?;
            let mut config = config;
            if config.embedded.kafka || config.embedded.s3 {
                adopt_running_platform(&mut config)?;
            }
            let metrics = mediaflow_telemetry::Metrics::new();
            match mediaflow::run_stage(&stage, &config, token, metrics).await? {
                mediaflow::Stopped::Drained => Ok(ExitCode::SUCCESS),
                mediaflow::Stopped::HandedBack { messages } => {
                    eprintln!(
                        "mediaflow: {messages} message(s) were not finished by the drain deadline \
                         and were handed back uncommitted"
                    );
                    Ok(ExitCode::from(HANDED_BACK))
                }
            }
        }
        Command::Tail {
            topic,
            from_beginning,
            max,
        } => {
            let mut config = config;
            if config.embedded.kafka {
                adopt_running_platform(&mut config)?;
            }
            let bus = Bus::new(config.bus.clone());
            bus.ping(Duration::from_secs(5)).await.with_context(|| {
                format!(
                    "Kafka at {} does not answer (is `mediaflow up` running?)",
                    config.bus.brokers
                )
            })?;
            let topic = format!("{}{topic}", config.bus.topic_prefix);
            let token = CancellationToken::new();
            cancel_on_signals(token.clone())?;
            let mut out = std::io::stdout();
            mediaflow::tail::tail(&bus, &topic, from_beginning, max, token, &mut out).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Backfill {
            location,
            batch,
            failure_policy,
        } => {
            let (bucket, prefix) = mediaflow::backfill::parse_location(&location)?;
            let mut config = config;
            if config.embedded.kafka || config.embedded.s3 {
                adopt_running_platform(&mut config)?;
            }
            let bus = Bus::new(config.bus.clone());
            let store = mediaflow_store::ObjectStore::new(&config.store);
            let db = mediaflow_db::Db::connect(&config.database_url(), 2).await?;
            let stages = mediaflow::Topology::load(&config, &mediaflow::Registry::default())?
                .upload_stages();
            let into = batch
                .map(|name| {
                    let failure_policy = serde_json::from_value(serde_json::Value::String(
                        failure_policy.clone(),
                    ))
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "--failure-policy: `{failure_policy}` is not fail-batch or complete-partial"
                        )
                    })?;
                    anyhow::Ok(mediaflow::backfill::IntoBatch {
                        name,
                        failure_policy,
                    })
                })
                .transpose()?;
            let report = mediaflow::backfill::backfill(
                &store,
                &bucket,
                &prefix,
                &db,
                &bus,
                &stages,
                into.as_ref(),
            )
            .await?;
            for (key, why) in &report.skipped {
                println!("skipped s3://{bucket}/{key}: {why}");
            }
            println!(
                "enqueued {}, enqueued before {}, skipped {}",
                report.enqueued,
                report.already,
                report.skipped.len()
            );
            if let Some(id) = &report.batch {
                println!("batch {id}: GET /v1/batches/{id}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq { command } => {
            let mut config = config;
            if config.embedded.kafka {
                adopt_running_platform(&mut config)?;
            }
            let bus = Bus::new(config.bus.clone());
            let db = mediaflow_db::Db::connect(&config.database_url(), 2).await?;
            match command {
                DlqCommand::List { filter } => {
                    let filter = mediaflow::dlq::Filter {
                        stage: filter.stage,
                        class: filter.class,
                    };
                    let entries = mediaflow::dlq::list(&bus, &db, &filter).await?;
                    mediaflow::dlq::print(&entries, &mut std::io::stdout())?;
                }
                DlqCommand::Replay { filter } => {
                    let filter = mediaflow::dlq::Filter {
                        stage: filter.stage,
                        class: filter.class,
                    };
                    let r = mediaflow::dlq::replay(&bus, &db, &filter).await?;
                    println!(
                        "replayed {}, already replayed {}, not replayable (not CloudEvents) {}",
                        r.replayed, r.already, r.unreplayable
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Pipeline { command } => {
            let kinds = mediaflow::Registry::default();
            let file = match &command {
                PipelineCommand::Check { file } | PipelineCommand::Graph { file, .. } => file,
            };
            let pipeline = match mediaflow_pipeline::load(file, &kinds) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::from(2));
                }
            };
            match command {
                PipelineCommand::Check { file } => println!(
                    "{}: {} topic(s), {} stage(s), no problems",
                    file.display(),
                    pipeline.topics.len(),
                    pipeline.stages.len()
                ),
                PipelineCommand::Graph { format, .. } => print!(
                    "{}",
                    match format {
                        GraphFormat::Text => mediaflow_pipeline::graph::text(&pipeline),
                        GraphFormat::Dot => mediaflow_pipeline::graph::dot(&pipeline),
                        GraphFormat::Mermaid => mediaflow_pipeline::graph::mermaid(&pipeline),
                    }
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Batch {
            command:
                BatchCommand::Upload {
                    source,
                    name,
                    failure_policy,
                    concurrency,
                    wait,
                    url,
                },
        } => {
            let job = mediaflow::batch::BatchUpload {
                base: gateway_base(&config, url),
                source,
                name,
                failure_policy,
                concurrency,
                wait: wait.map(Duration::from_secs),
            };
            let batch = mediaflow::batch::upload(&job).await?;
            print!("{}", mediaflow::batch::summary(&batch));
            Ok(ExitCode::SUCCESS)
        }
        Command::Mail { show } => {
            let dir = config.data_dir.join("mail");
            let mails = mediaflow_embedded::read_maildir(&dir)?;
            match show {
                Some(id) => {
                    let mail = mails
                        .iter()
                        .find(|m| m.id == id)
                        .with_context(|| format!("no mail `{id}` in {}", dir.display()))?;
                    print!("{}", String::from_utf8_lossy(&std::fs::read(&mail.path)?));
                }
                None if mails.is_empty() => {
                    println!("no mail in {} yet", dir.display());
                }
                None => {
                    for m in &mails {
                        let received: chrono::DateTime<chrono::Utc> = m.received.into();
                        println!(
                            "{}  {}  to {}  {}",
                            m.id,
                            received.format("%Y-%m-%d %H:%M:%S"),
                            m.rcpt_to.join(", "),
                            m.subject.as_deref().unwrap_or("(no subject)")
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Config => {
            print!("{}", toml::to_string_pretty(&config)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// With embedded infrastructure configured, `run` and `tail` join the platform that `up` started
/// on this data folder, reading its endpoints file.
/// Where the gateway answers: `url`, else the running `mediaflow up`'s, else `gateway.listen`.
fn gateway_base(config: &MediaflowConfig, url: Option<String>) -> String {
    if let Some(url) = url {
        return url.trim_end_matches('/').to_owned();
    }
    let running = std::fs::read_to_string(Endpoints::file(&config.data_dir))
        .ok()
        .and_then(|text| serde_json::from_str::<Endpoints>(&text).ok());
    if let Some(endpoints) = running {
        return endpoints.gateway;
    }
    let mut listen = config.gateway.listen;
    if listen.ip().is_unspecified() {
        listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{listen}")
}

fn adopt_running_platform(config: &mut MediaflowConfig) -> Result<()> {
    let file = Endpoints::file(&config.data_dir);
    let text = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "no running platform found ({} is missing): start `mediaflow up` first, or set \
             embedded.kafka/embedded.s3 to false and point bus.brokers/store.endpoint at your services",
            file.display()
        )
    })?;
    let endpoints: Endpoints =
        serde_json::from_str(&text).with_context(|| format!("reading {}", file.display()))?;
    if config.embedded.kafka {
        config.bus.brokers = endpoints.kafka;
    }
    if config.embedded.s3 {
        config.store.endpoint = endpoints.s3;
    }
    if config.embedded.smtp
        && config.mail.host.is_empty()
        && let Some((host, port)) = endpoints.smtp.rsplit_once(':')
    {
        config.mail.host = host.to_owned();
        config.mail.port = port.parse().context("the endpoints file's SMTP port")?;
    }
    Ok(())
}
