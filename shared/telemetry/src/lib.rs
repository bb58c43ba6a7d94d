//! Telemetry shared by every service: structured logging set-up and the Prometheus metrics the
//! data path reports, rendered in the text exposition format for `/metrics`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (production).
    Json,
    /// Human-readable lines (a terminal).
    Pretty,
}

/// Installs the global tracing subscriber; `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second initialisation (tests starting several platforms) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UploadLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PortLabels {
    stage: String,
    port: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    stage: String,
    step: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageOnly {
    stage: String,
}

/// The platform's metrics. Cheap to clone; all clones update one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    uploads: Family<UploadLabels, Counter>,
    upload_bytes: Counter,
    stage_messages: Family<StageLabels, Counter>,
    stage_errors: Family<StageLabels, Counter>,
    stage_seconds: Family<StageOnly, Histogram>,
    chain_steps: Family<StepLabels, Histogram>,
    stage_in_flight: Family<StageOnly, Gauge>,
    stage_limit: Family<StageOnly, Gauge>,
    dead_letters: Family<StageLabels, Counter>,
    stage_outputs: Family<PortLabels, Counter>,
    stage_dropped: Family<StageOnly, Counter>,
    shard_healthy: Family<PortLabels, Gauge>,
    consumer_lag: Family<StageOnly, Gauge>,
    stage_restarts: Family<StageOnly, Counter>,
    stage_stalls: Family<StageOnly, Counter>,
    stage_wedged: Family<StageOnly, Gauge>,
    /// Stages the watchdog finds wedged now, with what it saw: readiness fails while any is.
    wedged: Arc<Mutex<std::collections::BTreeMap<String, String>>>,
    source_items: Family<SourceLabels, Counter>,
    source_polls: Family<SourceLabels, Counter>,
    mails: Family<StageLabels, Counter>,
    hook_calls: Family<StageLabels, Counter>,
    signups: Family<UploadLabels, Counter>,
    coordinated: Family<StageLabels, Counter>,
    late_events: Family<StageOnly, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mediaflow");
        let uploads = Family::<UploadLabels, Counter>::default();
        registry.register("uploads", "Upload requests by outcome", uploads.clone());
        let upload_bytes = Counter::default();
        registry.register(
            "upload_bytes",
            "Bytes of accepted uploads",
            upload_bytes.clone(),
        );
        let mails = Family::<StageLabels, Counter>::default();
        registry.register(
            "mails",
            "Mails a mail stage handled, by outcome (sent, unconfirmed: committed but the relay's answer was lost, refused, duplicate: sent before)",
            mails.clone(),
        );
        let hook_calls = Family::<StageLabels, Counter>::default();
        registry.register(
            "hook_calls",
            "Webhook requests, by outcome (2xx, or the status or error that failed them)",
            hook_calls.clone(),
        );
        let signups = Family::<UploadLabels, Counter>::default();
        registry.register(
            "signups",
            "Sign-up and verification requests, by outcome",
            signups.clone(),
        );
        let coordinated = Family::<StageLabels, Counter>::default();
        registry.register(
            "coordinated",
            "What join and reduce stages did, by stage and outcome (released, reported, emitted, recovered: an emission found already published after a crash)",
            coordinated.clone(),
        );
        let late_events = Family::<StageOnly, Counter>::default();
        registry.register(
            "late_events",
            "Events a windowed reduce stage received after their window closed, sent to its late topic",
            late_events.clone(),
        );
        let stage_messages = Family::<StageLabels, Counter>::default();
        registry.register(
            "stage_messages",
            "Messages a stage finished, by outcome (ok, transient, permanent, bad_input)",
            stage_messages.clone(),
        );
        let stage_outputs = Family::<PortLabels, Counter>::default();
        registry.register(
            "stage_outputs",
            "Events a stage published, by output port (acknowledged by the broker)",
            stage_outputs.clone(),
        );
        let stage_dropped = Family::<StageOnly, Counter>::default();
        registry.register(
            "stage_dropped",
            "Events a filter or splitter passed on to no port",
            stage_dropped.clone(),
        );
        let shard_healthy = Family::<PortLabels, Gauge>::default();
        registry.register(
            "sharder_shard_healthy",
            "Whether a sharder routes to a shard (1) or around it (0), by port",
            shard_healthy.clone(),
        );
        let stage_errors = Family::<StageLabels, Counter>::default();
        registry.register(
            "stage_errors",
            "Errors inside a stage that did not finish a message (retries, consumer errors)",
            stage_errors.clone(),
        );
        let stage_seconds = Family::<StageOnly, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register(
            "stage_processing_seconds",
            "Time from taking a message to acknowledging it",
            stage_seconds.clone(),
        );
        let chain_steps = Family::<StepLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register(
            "chain_step_seconds",
            "Time a step of a chain took, by outcome (ok, or the error class)",
            chain_steps.clone(),
        );
        let stage_in_flight = Family::<StageOnly, Gauge>::default();
        registry.register(
            "stage_in_flight",
            "Messages a stage has taken and not finished",
            stage_in_flight.clone(),
        );
        let stage_limit = Family::<StageOnly, Gauge>::default();
        registry.register(
            "stage_concurrency_limit",
            "Messages a stage may have in flight now (sized from latency unless fixed)",
            stage_limit.clone(),
        );
        let dead_letters = Family::<StageLabels, Counter>::default();
        registry.register(
            "dead_letters",
            "Messages a stage gave up on and sent to the dead-letter topic, by error class",
            dead_letters.clone(),
        );
        let consumer_lag = Family::<StageOnly, Gauge>::default();
        registry.register(
            "consumer_lag",
            "Messages on a stage's input topics its consumer group has not committed yet",
            consumer_lag.clone(),
        );
        let stage_restarts = Family::<StageOnly, Counter>::default();
        registry.register(
            "stage_restarts",
            "Times `mediaflow up` restarted a stage (or source) that failed",
            stage_restarts.clone(),
        );
        let stage_stalls = Family::<StageOnly, Counter>::default();
        registry.register(
            "stage_stalls",
            "Times the watchdog found a stage wedged (no partitions, or none of its waiting \
             messages committed, for the stall timeout) and made it rejoin its group",
            stage_stalls.clone(),
        );
        let stage_wedged = Family::<StageOnly, Gauge>::default();
        registry.register(
            "stage_wedged",
            "1 while the watchdog finds a stage wedged, else 0",
            stage_wedged.clone(),
        );
        let source_items = Family::<SourceLabels, Counter>::default();
        registry.register(
            "source_items",
            "Items a source looked at, by outcome (enqueued, or why not)",
            source_items.clone(),
        );
        let source_polls = Family::<SourceLabels, Counter>::default();
        registry.register(
            "source_polls",
            "Times a source listed its items, by outcome (ok, error)",
            source_polls.clone(),
        );
        Self {
            registry: Arc::new(Mutex::new(registry)),
            source_polls,
            mails,
            hook_calls,
            signups,
            coordinated,
            late_events,
            consumer_lag,
            stage_restarts,
            stage_stalls,
            stage_wedged,
            wedged: Arc::default(),
            source_items,
            stage_in_flight,
            stage_limit,
            dead_letters,
            stage_outputs,
            stage_dropped,
            shard_healthy,
            uploads,
            upload_bytes,
            stage_messages,
            stage_errors,
            stage_seconds,
            chain_steps,
        }
    }

    /// An upload request finished with `outcome` (`accepted`, or the problem type).
    pub fn upload(&self, outcome: &str, bytes: u64) {
        self.uploads
            .get_or_create(&UploadLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
        if outcome == "accepted" {
            self.upload_bytes.inc_by(bytes);
        }
    }

    /// A mail stage handled a mail with `outcome`.
    pub fn mail(&self, stage: &str, outcome: &str) {
        self.mails
            .get_or_create(&StageLabels {
                stage: stage.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// A webhook stage's request ended with `outcome` (`2xx`, the status, or `error`).
    pub fn hook_call(&self, stage: &str, outcome: &str) {
        self.hook_calls
            .get_or_create(&StageLabels {
                stage: stage.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// A sign-up or verification request finished with `outcome`.
    pub fn signup(&self, outcome: &str) {
        self.signups
            .get_or_create(&UploadLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// A join or reduce stage did `outcome` (released, reported, emitted, recovered).
    pub fn coordinated(&self, stage: &str, outcome: &str) {
        self.coordinated
            .get_or_create(&StageLabels {
                stage: stage.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// A reduce stage sent an event that came after its window closed to its late topic.
    pub fn late_event(&self, stage: &str) {
        self.late_events
            .get_or_create(&StageOnly {
                stage: stage.to_owned(),
            })
            .inc();
    }

    /// A stage finished a message.
    pub fn stage_processed(&self, stage: &str, outcome: &str, took: Duration) {
        self.stage_messages
            .get_or_create(&StageLabels {
                stage: stage.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        self.stage_seconds
            .get_or_create(&StageOnly {
                stage: stage.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// A step of a chain finished with `outcome` (`ok`, or the error class).
    pub fn chain_step(&self, stage: &str, step: &str, outcome: &str, took: Duration) {
        self.chain_steps
            .get_or_create(&StepLabels {
                stage: stage.to_owned(),
                step: step.to_owned(),
                outcome: outcome.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// A stage hit an error that did not finish a message.
    pub fn stage_error(&self, stage: &str, kind: &str) {
        self.stage_errors
            .get_or_create(&StageLabels {
                stage: stage.to_owned(),
                outcome: kind.to_owned(),
            })
            .inc();
    }

    /// How many messages a stage has in flight now.
    pub fn stage_in_flight(&self, stage: &str, n: usize) {
        self.stage_in_flight
            .get_or_create(&StageOnly {
                stage: stage.to_owned(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// How many messages a stage may have in flight now.
    pub fn stage_limit(&self, stage: &str, n: usize) {
        self.stage_limit
            .get_or_create(&StageOnly {
                stage: stage.to_owned(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A stage's consumer lag, as last measured.
    pub fn consumer_lag(&self, stage: &str, lag: i64) {
        self.consumer_lag
            .get_or_create(&StageOnly {
                stage: stage.to_owned(),
            })
            .set(lag);
    }

    /// A stage published an event on output `port`.
    pub fn stage_output(&self, stage: &str, port: &str) {
        self.stage_outputs
            .get_or_create(&PortLabels {
                stage: stage.to_owned(),
                port: port.to_owned(),
            })
            .inc();
    }

    /// A filter or splitter passed an event on to no port.
    pub fn stage_dropped(&self, stage: &str) {
        self.stage_dropped
            .get_or_create(&StageOnly {
                stage: stage.to_owned(),
            })
            .inc();
    }

    /// Whether sharder `stage` routes to its shard on `port` now.
    pub fn shard_healthy(&self, stage: &str, port: &str, healthy: bool) {
        self.shard_healthy
            .get_or_create(&PortLabels {
                stage: stage.to_owned(),
                port: port.to_owned(),
            })
            .set(i64::from(healthy));
    }

    /// A stage sent a message to the dead-letter topic.
    pub fn dead_lettered(&self, stage: &str, class: &str) {
        self.dead_letters
            .get_or_create(&StageLabels {
                stage: stage.to_owned(),
                outcome: class.to_owned(),
            })
            .inc();
    }

    /// `mediaflow up` restarted a failed stage.
    pub fn stage_restarted(&self, stage: &str) {
        self.stage_restarts
            .get_or_create(&StageOnly {
                stage: stage.to_owned(),
            })
            .inc();
    }

    /// The watchdog found `stage` wedged, for `reason`: counted, and readiness fails naming it
    /// until `stage_unwedged`.
    pub fn stage_wedged(&self, stage: &str, reason: &str) {
        let labels = StageOnly {
            stage: stage.to_owned(),
        };
        self.stage_stalls.get_or_create(&labels).inc();
        self.stage_wedged.get_or_create(&labels).set(1);
        self.wedged_stages_lock()
            .insert(stage.to_owned(), reason.to_owned());
    }

    /// The watchdog sees `stage` working (or idle) again.
    pub fn stage_unwedged(&self, stage: &str) {
        if self.wedged_stages_lock().remove(stage).is_some() {
            self.stage_wedged
                .get_or_create(&StageOnly {
                    stage: stage.to_owned(),
                })
                .set(0);
        }
    }

    /// The stages found wedged now, with what the watchdog saw.
    pub fn wedged_stages(&self) -> std::collections::BTreeMap<String, String> {
        self.wedged_stages_lock().clone()
    }

    fn wedged_stages_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, String>> {
        self.wedged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A source enqueued an item (`enqueued`) or could not fetch it (`error`).
    pub fn source_item(&self, source: &str, outcome: &str) {
        self.source_items
            .get_or_create(&SourceLabels {
                source: source.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// A source listed its items (`ok`) or could not (`error`).
    pub fn source_polled(&self, source: &str, outcome: &str) {
        self.source_polls
            .get_or_create(&SourceLabels {
                source: source.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_recorded() {
        let m = Metrics::new();
        m.upload("accepted", 10);
        m.stage_processed("image-worker", "ok", Duration::from_millis(5));
        let text = m.render();
        assert!(
            text.contains("mediaflow_uploads_total{outcome=\"accepted\"} 1"),
            "{text}"
        );
        assert!(text.contains("mediaflow_upload_bytes_total 10"), "{text}");
        assert!(
            text.contains(
                "mediaflow_stage_messages_total{stage=\"image-worker\",outcome=\"ok\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_wedged_stage_is_counted_and_listed_until_it_heals() {
        let m = Metrics::new();
        m.stage_wedged("router", "holds no partitions");
        assert_eq!(
            m.wedged_stages().get("router").map(String::as_str),
            Some("holds no partitions")
        );
        let text = m.render();
        assert!(
            text.contains("mediaflow_stage_stalls_total{stage=\"router\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("mediaflow_stage_wedged{stage=\"router\"} 1"),
            "{text}"
        );
        m.stage_unwedged("router");
        assert!(m.wedged_stages().is_empty());
        assert!(
            m.render()
                .contains("mediaflow_stage_wedged{stage=\"router\"} 0")
        );
    }
}
