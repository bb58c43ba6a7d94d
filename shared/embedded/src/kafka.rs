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
        wait_ready(&mut child, port, &log, Duration::from_secs(60)).await?;
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

/// Waits until the child itself listens on `port`. A connection alone is not proof: the port was
/// found free before the broker started, and another process (a parallel test's broker, say) may
/// have bound it meanwhile; the child then fails to bind and exits, and the caller tries another
/// port.
async fn wait_ready(
    child: &mut Child,
    port: u16,
    log: &Path,
    limit: Duration,
) -> Result<(), EmbeddedError> {
    let addr = format!("127.0.0.1:{port}");
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(EmbeddedError::Exited {
                what: "kafka (tansu)",
                status: status.to_string(),
                log: log.display().to_string(),
            });
        }
        if tokio::net::TcpStream::connect(&addr).await.is_ok()
            && child.id().is_some_and(|pid| listener::owned_by(pid, port))
        {
            return Ok(());
        }
        if started.elapsed() > limit {
            return Err(EmbeddedError::NotReady {
                what: "kafka (tansu)",
                addr,
                waited_s: limit.as_secs(),
                log: log.display().to_string(),
            });
        }
        // Polling a port that is not open yet; the connect attempt itself is immediate.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

mod listener {
    //! Which process listens on a TCP port, from Linux's `/proc`: the listening socket's inode in
    //! `/proc/net/tcp{,6}` must be among the process's open file descriptors.

    use std::collections::HashSet;

    /// Whether process `pid` holds the socket listening on `port`. Where `/proc` is not there
    /// (not Linux), there is no way to tell and the connection is taken as proof.
    pub fn owned_by(pid: u32, port: u16) -> bool {
        let tables: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .filter_map(|path| std::fs::read_to_string(path).ok())
            .collect();
        if tables.is_empty() {
            return true;
        }
        let listening: HashSet<u64> = tables
            .iter()
            .flat_map(|table| listening_inodes(table, port))
            .collect();
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return false;
        };
        fds.filter_map(Result::ok)
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter_map(|target| socket_inode(&target.to_string_lossy()))
            .any(|inode| listening.contains(&inode))
    }

    /// Inodes of the sockets in LISTEN state (`0A`) on `port` in a `/proc/net/tcp` table.
    pub fn listening_inodes(table: &str, port: u16) -> impl Iterator<Item = u64> + '_ {
        table.lines().skip(1).filter_map(move |line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit_once(':')?.1;
            let listening =
                u16::from_str_radix(local_port, 16).ok()? == port && *fields.get(3)? == "0A";
            listening.then(|| fields.get(9)?.parse().ok()).flatten()
        })
    }

    /// `socket:[12345]` → 12345.
    fn socket_inode(link: &str) -> Option<u64> {
        link.strip_prefix("socket:[")?
            .strip_suffix(']')?
            .parse()
            .ok()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn reads_listening_sockets_of_a_port() {
            let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:9F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:9F91 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 100 0 0 10 0";
            let found: Vec<u64> = listening_inodes(table, 0x9F91).collect();
            assert_eq!(found, vec![4242]);
        }

        #[test]
        fn this_process_owns_its_listener_and_not_another_port() {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            assert!(owned_by(std::process::id(), port));
            drop(listener);
            assert!(!owned_by(std::process::id(), port));
        }
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
