//! librdkafka's own log lines, forwarded to `tracing` (target `librdkafka`) at most once per
//! `WINDOW` for each kind of line, process-wide. While a broker is down every client reports
//! every reconnect attempt; users get the first line, then one a window saying how many like it
//! were held back.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;

/// How long the same kind of line is held back after it was logged.
const WINDOW: Duration = Duration::from_secs(30);

/// The client context of every rdkafka client mediaflow makes, apart from the stage consumer's
/// (which adds rebalance hooks and logs the same way).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Quiet;

impl ClientContext for Quiet {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        forward(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        forward_error(&error, reason);
    }
}

impl ConsumerContext for Quiet {}

/// When each kind of line was last logged, and how many were held back since.
static SEEN: Mutex<Option<HashMap<String, (Instant, u64)>>> = Mutex::new(None);

/// Whether a line of kind `key` may be logged now, and how many of its kind were held back
/// since the last one.
fn admit(key: &str, now: Instant) -> Option<u64> {
    let mut seen = SEEN.lock().unwrap_or_else(PoisonError::into_inner);
    let seen = seen.get_or_insert_with(HashMap::new);
    match seen.get_mut(key) {
        Some((last, held)) if now.duration_since(*last) < WINDOW => {
            *held += 1;
            None
        }
        Some(entry) => {
            let held = entry.1;
            *entry = (now, 0);
            Some(held)
        }
        None => {
            seen.insert(key.to_owned(), (now, 0));
            Some(0)
        }
    }
}

pub(crate) fn forward(level: RDKafkaLogLevel, fac: &str, message: &str) {
    // One kind per facility and level: "FAIL" lines about every broker connection are one kind.
    let Some(held) = admit(&format!("{level:?}/{fac}"), Instant::now()) else {
        return;
    };
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", held_back = held, "{fac} {message}")
        }
        RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", held_back = held, "{fac} {message}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", held_back = held, "{fac} {message}")
        }
        RDKafkaLogLevel::Debug => {
            tracing::debug!(target: "librdkafka", held_back = held, "{fac} {message}")
        }
    }
}

pub(crate) fn forward_error(error: &KafkaError, reason: &str) {
    let kind = format!("error/{:?}", error.rdkafka_error_code());
    if let Some(held) = admit(&kind, Instant::now()) {
        tracing::error!(target: "librdkafka", held_back = held, "{error}: {reason}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_kind_is_held_back_for_a_window_and_counted() {
        let t0 = Instant::now();
        let key = "test/held-back";
        assert_eq!(admit(key, t0), Some(0));
        for i in 1..=5 {
            assert_eq!(admit(key, t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(admit("test/other-kind", t0), Some(0));
        assert_eq!(admit(key, t0 + WINDOW + Duration::from_secs(1)), Some(5));
        assert_eq!(admit(key, t0 + WINDOW + Duration::from_secs(2)), None);
    }
}
