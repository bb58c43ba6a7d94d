//! The embedded broker: nisshi 0.8 (tansu's maintained successor) with SQLite storage, run as a
//! child process whose data lives in the data folder. It cannot be linked into this binary (its
//! bundled SQLite clashes with sqlx's), so it is supervised instead.
//!
//! The broker runs in a process group of its own, so that a terminal's Ctrl-C (which signals the
//! whole foreground group) reaches only `mediaflow`, which stops the broker after its stages have
//! drained and committed. Where `setpriv` exists (util-linux) the broker is also told to die with
//! its parent, so a `mediaflow` killed outright leaves no broker behind; and a broker left over
//! from a crash on the same data folder is stopped before a new one starts.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};

use crate::EmbeddedError;

/// The broker's executable name.
pub const BROKER: &str = "nisshi";

/// The broker's process id, in its folder: how a restarted platform finds a broker left over
/// from a crash.
const PID_FILE: &str = "broker.pid";

/// A running embedded broker, watched by a task that owns the child process. Dropping it kills
/// the broker.
#[derive(Debug)]
pub struct EmbeddedKafka {
    addr: String,
    log: PathBuf,
    pid_file: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    exit: watch::Receiver<Option<String>>,
    watcher: tokio::task::JoinHandle<()>,
}

/// Looks for the broker binary: `explicit` if given, else `$PATH`, else `$CARGO_HOME/bin`, else
/// `~/.cargo/bin`.
pub fn find_broker(explicit: Option<&Path>) -> Result<PathBuf, EmbeddedError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_owned())
        } else {
            Err(EmbeddedError::BrokerMissing {
                looked: p.display().to_string(),
            })
        };
    }
    let mut candidates = in_path(BROKER);
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        candidates.push(PathBuf::from(home).join("bin").join(BROKER));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin").join(BROKER));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| EmbeddedError::BrokerMissing {
            looked: "$PATH, $CARGO_HOME/bin, ~/.cargo/bin".into(),
        })
}

/// `name` in every folder of `$PATH`.
fn in_path(name: &str) -> Vec<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect())
        .unwrap_or_default()
}

fn spawn_error(source: std::io::Error) -> EmbeddedError {
    EmbeddedError::Spawn {
        what: "kafka",
        source,
    }
}

impl EmbeddedKafka {
    /// Starts the broker on `127.0.0.1:port` with its SQLite file under `dir`, and waits until it
    /// accepts connections. A broker still running on `dir` from a crashed platform is stopped
    /// first.
    ///
    /// Call it from a thread that lives as long as the broker should (the main thread, or a
    /// runtime worker): Linux sends the parent-death signal when the spawning thread exits.
    pub async fn start(broker: &Path, dir: &Path, port: u16) -> Result<Self, EmbeddedError> {
        std::fs::create_dir_all(dir).map_err(spawn_error)?;
        let pid_file = dir.join(PID_FILE);
        stop_leftover(&pid_file, dir).await;
        let addr = format!("127.0.0.1:{port}");
        let url = format!("tcp://{addr}");
        let log = dir.join("broker.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(spawn_error)?;
        let log_err = log_file.try_clone().map_err(spawn_error)?;
        let mut command = match in_path("setpriv").into_iter().find(|p| p.is_file()) {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "KILL", "--"]).arg(broker);
                c
            }
            None => Command::new(broker),
        };
        let mut child = command
            .arg("broker")
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            // Relative to the working directory: <dir>/broker.db.
            .args(["--storage-engine", "sqlite://broker.db"])
            .current_dir(dir)
            .env(
                "RUST_LOG",
                std::env::var("MEDIAFLOW_BROKER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            // Out of the terminal's foreground group: Ctrl-C is for `mediaflow`, which stops the
            // broker once its stages have committed.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| EmbeddedError::Spawn {
                what: "kafka (the broker)",
                source,
            })?;
        if let Some(pid) = child.id() {
            std::fs::write(&pid_file, pid.to_string()).map_err(spawn_error)?;
        }
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
                    // Killed and reaped: no zombie is left.
                    let _ = child.kill().await;
                    "stopped".to_owned()
                }
            };
            let _ = exit_tx.send(Some(status));
        });
        Ok(Self {
            addr,
            log,
            pid_file,
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

/// Stops the broker a crashed platform left running on `dir`, if any: the process named in the
/// pid file, if it still runs the broker in `dir` (a recycled pid is left alone).
async fn stop_leftover(pid_file: &Path, dir: &Path) {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return;
    };
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let same_dir = match (std::fs::read_link(proc.join("cwd")), dir.canonicalize()) {
        (Ok(cwd), Ok(dir)) => cwd == dir,
        _ => false,
    };
    let is_broker = std::fs::read(proc.join("cmdline")).is_ok_and(|cmdline| {
        cmdline
            .split(|&b| b == 0)
            .any(|arg| arg.ends_with(BROKER.as_bytes()))
    });
    if !(same_dir && is_broker) {
        return;
    }
    tracing::warn!(
        pid,
        "a broker from an earlier run still serves this data folder; stopping it"
    );
    let killed = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .await;
    if let Err(e) = killed {
        tracing::warn!(pid, error = %e, "could not stop the earlier broker");
        return;
    }
    // Until the process is gone (it is not our child; init reaps it).
    let until = Instant::now() + Duration::from_secs(10);
    while proc.exists() && Instant::now() < until {
        // Polling for the exit of a process that is not ours to wait on.
        tokio::time::sleep(Duration::from_millis(20)).await;
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
                what: "kafka (the broker)",
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
                what: "kafka (the broker)",
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
        let _ = std::fs::remove_file(&self.pid_file);
    }
}
