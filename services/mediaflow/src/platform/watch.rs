//! A consuming stage under its watchdog: the stage runtime's loop, and beside it a task that
//! measures the stage's lag and judges it; a wedged stage is reported and rejoins its group.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use mediaflow_bus::{Bus, StartFrom};
use mediaflow_runtime::{
    Handler, Observation, Ports, StageOptions, StageProbe, StageRun, Stopped, Verdict, Watchdog,
};
use mediaflow_telemetry::Metrics;
use tokio_util::sync::CancellationToken;

use super::infra::Services;

/// Everything a stage's handler runs with: its inputs and bound ports (topic names under the
/// prefix), its options, the shared connections, and the token that stops it.
pub struct Wiring {
    pub(crate) name: String,
    /// The consumer group: the stage name under the topic prefix, so test runs never share one.
    pub(crate) group: String,
    pub(crate) inputs: Vec<String>,
    /// librdkafka properties of the stage's consumer (its declaration's `consumer`).
    pub(crate) consumer: BTreeMap<String, String>,
    pub(crate) ports: Ports,
    pub(crate) options: StageOptions,
    pub(crate) stall_timeout: Duration,
    pub(crate) services: Arc<Services>,
    pub(crate) tracker: Arc<dyn mediaflow_runtime::Tracker>,
    pub(crate) shutdown: CancellationToken,
}

/// Runs `handler` as the stage `wiring` describes on the stage runtime, under a watchdog: an
/// instance found wedged is drained and joins its group again, as often as it takes.
pub(crate) async fn consume<H: Handler>(handler: H, wiring: Wiring) -> Result<Stopped> {
    let Wiring {
        name,
        group,
        inputs,
        consumer,
        ports,
        options,
        stall_timeout,
        services: s,
        tracker,
        shutdown,
    } = wiring;
    let name = name.as_str();
    let inputs = inputs.as_slice();
    let handler = Arc::new(handler);
    // One producer for every stage of the process; each stamps its own source.
    let sink: Arc<dyn mediaflow_runtime::Sink> =
        Arc::new(s.publisher.with_source(&format!("/mediaflow/{name}")));
    loop {
        let probe = StageProbe::new();
        let watch = tokio::spawn(watch_stage(
            name.to_owned(),
            group.clone(),
            inputs.to_vec(),
            probe.clone(),
            stall_timeout,
            s.bus.clone(),
            s.metrics.clone(),
        ));
        let run = StageRun {
            name: name.to_owned(),
            handler: handler.clone(),
            sink: sink.clone(),
            ports: ports.clone(),
            dead_letters: s.bus.topics().dead_letters(),
            tracker: Some(tracker.clone()),
            options,
            metrics: s.metrics.clone(),
            probe: probe.clone(),
        };
        let stopped = mediaflow_runtime::run_stage(
            run,
            |listener| {
                s.bus
                    .consumer_with(&group, inputs, StartFrom::Earliest, listener, &consumer)
            },
            shutdown.clone(),
        )
        .await;
        watch.abort();
        if probe.rejoin_requested() && !shutdown.is_cancelled() {
            // A consumer in a bad state may also fail to close; the new one starts clean.
            if let Err(e) = stopped {
                tracing::warn!(stage = name, error = %e, "the wedged consumer did not close cleanly");
            }
            tracing::info!(stage = name, "joining the consumer group again");
            continue;
        }
        return Ok(stopped?);
    }
}

/// How often a stage's consumer lag is measured and its watchdog looks: every 5 s, or more
/// often when the stall timeout is short.
fn watch_interval(stall_timeout: Duration) -> Duration {
    (stall_timeout / 3).clamp(Duration::from_millis(200), Duration::from_secs(5))
}

/// Measures the stage's consumer lag (messages on its inputs not yet committed) as a metric and
/// judges it with the watchdog until aborted. A wedged stage is logged, counted, named by
/// readiness and asked to rejoin its group; readiness clears once it is seen healthy again.
async fn watch_stage(
    stage: String,
    group: String,
    inputs: Vec<String>,
    probe: StageProbe,
    stall_timeout: Duration,
    bus: Bus,
    metrics: Metrics,
) {
    let mut watchdog = Watchdog::new(stall_timeout);
    let mut tick = tokio::time::interval(watch_interval(stall_timeout));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The watchdog is blind while positions cannot be read: said once, not at every tick.
    let mut blind = false;
    loop {
        tick.tick().await;
        let positions = match bus.group_positions(&group, &inputs).await {
            Ok(p) => {
                if std::mem::take(&mut blind) {
                    tracing::info!(stage, "consumer lag can be measured again");
                }
                p
            }
            Err(e) if !blind => {
                blind = true;
                tracing::warn!(stage, error = %e, "cannot measure consumer lag; the stage's watchdog waits until it can");
                continue;
            }
            Err(_) => continue,
        };
        metrics.consumer_lag(&stage, positions.iter().map(|p| p.lag()).sum());
        // No consumer yet (joining) or none any more: nothing to judge.
        let Some((held, in_flight)) = probe.held_and_in_flight() else {
            continue;
        };
        let seen = Observation {
            held,
            in_flight,
            positions,
        };
        match watchdog.observe(std::time::Instant::now(), &seen) {
            Verdict::Healthy => metrics.stage_unwedged(&stage),
            Verdict::Suspect => {}
            Verdict::Wedged(reason) => {
                tracing::error!(
                    stage,
                    group,
                    reason,
                    "stage wedged; making it rejoin its consumer group"
                );
                metrics.stage_wedged(&stage, &reason);
                probe.request_rejoin();
                return;
            }
        }
    }
}
