//! Supervision under `mediaflow up`: a failed stage is restarted with backoff while the rest
//! runs on; the first failure of a vital part (the gateway, the broker) stops the platform.

use std::sync::Arc;
use std::time::Duration;

use mediaflow_runtime::Stopped;
use tokio_util::sync::CancellationToken;

use super::{Running, run_stage_with};

/// Backoff before the first restart of a failed stage; doubles per failure in a row.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);
/// Longest backoff between restarts.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(60);
/// A stage that ran this long before failing counts as healthy: its next restart is quick again.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Runs `stage` under `mediaflow up` until `shutdown`, as an orchestrator would: when it fails
/// (returns an error or panics) it is restarted after a backoff that doubles with each failure in
/// a row, while the rest of the platform keeps running.
pub(super) async fn supervise(stage: String, running: Arc<Running>, shutdown: CancellationToken) {
    let mut failures: u32 = 0;
    loop {
        let started = std::time::Instant::now();
        let run = {
            let (stage, running, token) = (stage.clone(), running.clone(), shutdown.clone());
            tokio::spawn(async move { run_stage_with(&stage, &running, token).await })
        };
        let error = match run.await {
            Ok(Ok(Stopped::Drained)) => return,
            Ok(Ok(Stopped::HandedBack { messages })) => {
                tracing::warn!(stage, messages, "handed back unfinished messages");
                return;
            }
            Ok(Err(e)) => format!("{e:#}"),
            Err(e) if e.is_panic() => format!("panicked: {}", panic_text(e.into_panic())),
            Err(e) => format!("{e}"),
        };
        if shutdown.is_cancelled() {
            tracing::error!(stage, error, "stage failed while stopping");
            return;
        }
        if started.elapsed() >= HEALTHY_RUN {
            failures = 0;
        }
        let wait = RESTART_BACKOFF
            .saturating_mul(1 << failures.min(6))
            .min(MAX_RESTART_BACKOFF);
        failures += 1;
        tracing::error!(stage, error, failures, restart_in = ?wait, "stage failed; restarting it");
        running.services.metrics.stage_restarted(&stage);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    match panic.downcast::<String>() {
        Ok(s) => *s,
        Err(panic) => panic
            .downcast_ref::<&str>()
            .map_or_else(|| "unknown panic".to_owned(), |s| (*s).to_owned()),
    }
}

/// The first failure of a part of the platform; recording it stops the platform.
#[derive(Clone)]
pub(super) struct Failure {
    first: Arc<std::sync::Mutex<Option<String>>>,
    shutdown: CancellationToken,
}

impl Failure {
    pub(super) fn new(shutdown: CancellationToken) -> Self {
        Self {
            first: Default::default(),
            shutdown,
        }
    }

    pub(super) fn record(&self, what: String) {
        tracing::error!(error = %what, "stopping the platform");
        let mut first = self
            .first
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        first.get_or_insert(what);
        self.shutdown.cancel();
    }

    pub(super) fn take(&self) -> Option<String> {
        self.first
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}
