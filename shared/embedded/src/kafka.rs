//! The embedded broker: tansu 0.6 with SQLite storage, run as a child process whose data lives in
//! the data folder. tansu cannot be linked into this binary (its bundled SQLite clashes with
//! sqlx's), so it is supervised instead.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};

use crate::EmbeddedError;

/// A running embedded broker, watched by a task that owns the child process. Dropping it kills
/// the broker.
#[derive(Debug)]
pub struct EmbeddedKafka {
    addr: String,
    log: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    exit: watch::Receiver<Option<String>>,
    watcher: tokio::task::JoinHandle<()>,
}

/// Looks for the `tansu` binary: `explicit` if given, else `$PATH`, else `~/.cargo/bin`.
pub fn find_tansu(explicit: Option<&Path>) -> Result<PathBuf, EmbeddedError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_owned())
        } else {
            Err(EmbeddedError::TansuMissing {
                looked: p.display().to_string(),
            })
        };
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("tansu")).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        candidates.push(PathBuf::from(home).join("bin/tansu"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/tansu"));
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| EmbeddedError::TansuMissing {
            looked: "$PATH, $CARGO_HOME/bin, ~/.cargo/bin".into(),
        })
}

impl EmbeddedKafka {
    /// Starts the broker on `127.0.0.1:port` with its SQLite file under `dir`, and waits until it
    /// accepts connections.
    pub async fn start(tansu: &Path, dir: &Path, port: u16) -> Result<Self, EmbeddedError> {
        std::fs::create_dir_all(dir).map_err(|source| EmbeddedError::Spawn {
            what: "kafka",
            source,
        })?;
        let addr = format!("127.0.0.1:{port}");
        let url = format!("tcp://{addr}");
        let log = dir.join("tansu.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|source| EmbeddedError::Spawn {
                what: "kafka",
                source,
            })?;
        let log_err = log_file
            .try_clone()
            .map_err(|source| EmbeddedError::Spawn {
                what: "kafka",
                source,
            })?;
        let child = Command::new(tansu)
            .arg("broker")
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            // Relative to the working directory: <dir>/tansu.db.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(dir)
            .env(
                "RUST_LOG",
                std::env::var("MEDIAFLOW_TANSU_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| EmbeddedError::Spawn {
                what: "kafka (tansu)",
                source,
            })?;
        let mut child = child;
        wait_ready(&mut child, &addr, &log, Duration::from_secs(60)).await?;
        tracing::info!(%addr, "embedded kafka broker ready");

        let (stop, stop_rx) = oneshot::channel();
        let (exit_tx, exit) = watch::channel(None);
        let watcher = tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => match status {
                    Ok(s) => format!("exited ({s})"),
                    Err(e) => format!("could not be watched: {e}"),
                },
                // Stopped on purpose, or the handle was dropped.
                _ = stop_rx => {
                    let _ = child.kill().await;
                    "stopped".to_owned()
                }
            };
            let _ = exit_tx.send(Some(status));
        });
        Ok(Self {
            addr,
            log,
            stop: Some(stop),
            exit,
            watcher,
        })
    }

    /// Resolves when the broker process has ended, with how it ended.
    pub fn exited(&self) -> impl Future<Output = String> + Send + 'static {
        let mut exit = self.exit.clone();
        async move {
            match exit.wait_for(Option::is_some).await {
                Ok(status) => status.clone().unwrap_or_default(),
                Err(_) => "watcher gone".to_owned(),
            }
        }
    }
}

async fn wait_ready(
    child: &mut Child,
    addr: &str,
    log: &Path,
    limit: Duration,
) -> Result<(), EmbeddedError> {
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(EmbeddedError::Exited {
                what: "kafka (tansu)",
                status: status.to_string(),
                log: log.display().to_string(),
            });
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if started.elapsed() > limit {
            return Err(EmbeddedError::NotReady {
                what: "kafka (tansu)",
                addr: addr.to_owned(),
                waited_s: limit.as_secs(),
                log: log.display().to_string(),
            });
        }
        // Polling a port that is not open yet; the connect attempt itself is immediate.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl EmbeddedKafka {
    /// `host:port` for `bootstrap.servers`.
    pub fn bootstrap(&self) -> &str {
        &self.addr
    }

    /// The broker's log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Stops the broker (SIGKILL; its SQLite storage is crash-safe) and waits for it to exit.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.watcher).await;
    }
}
