//! Embedded infrastructure for running mediaflow on one machine: the Kafka-compatible broker
//! (nisshi, as a supervised child process), an S3-compatible server over a local folder
//! (s3s-fs, in process) and an SMTP sink into a Maildir. All are reached through their real
//! protocols; nothing here is a mock.

mod kafka;
mod s3;
mod smtp;

pub use kafka::{BROKER, EmbeddedKafka, find_broker};
pub use s3::EmbeddedS3;
pub use smtp::{CapturedMail, EmbeddedSmtp, SmtpError, SmtpLimits, read_maildir};

/// Why embedded infrastructure could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(
        "the embedded broker `nisshi` was not found (looked in {looked}); `./x setup` installs \
         it (`cargo +nightly install nisshi --version 0.8.1 --no-default-features --features \
         libsql --locked`: it needs rustc 1.96 or newer), or set embedded.broker_bin to its path"
    )]
    BrokerMissing { looked: String },
    #[error("could not start {what}: {source}")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} did not accept connections on {addr} within {waited_s} s; see {log}")]
    NotReady {
        what: &'static str,
        addr: String,
        waited_s: u64,
        log: String,
    },
    #[error("{what} exited during start-up ({status}); see {log}")]
    Exited {
        what: &'static str,
        status: String,
        log: String,
    },
    #[error(
        "cannot start {what} on {addr}: the port is taken ({source}); is another mediaflow running?"
    )]
    PortInUse {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("S3 server: {0}")]
    S3(String),
}

/// Finds a free TCP port on 127.0.0.1 by binding port 0.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
