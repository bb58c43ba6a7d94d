//! A sharder's view of its shards' health. A shard is unhealthy when a stage reading its topic
//! has no consumer (no group members), or has messages waiting while its committed offset stays
//! where it is for `unhealthy_after_secs`. The sharder routes an unhealthy shard's keys to their
//! next shard on the ring, and back once the shard's readers commit again. Each decision is
//! logged and shown by `mediaflow_sharder_shard_healthy{stage, port}`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mediaflow_bus::Bus;
use mediaflow_linking::stages::ShardHealth;
use mediaflow_pipeline::kinds::SharderConfig;
use mediaflow_telemetry::Metrics;

use super::wiring::StageSpec;
use crate::registry::BuildContext;

/// One shard: its port, its topic, and the consumer groups of the stages reading it.
struct Shard {
    index: u32,
    port: String,
    topic: String,
    groups: Vec<String>,
    /// Per group: the committed total last seen, and since when the group has looked bad (no
    /// member, or that total not moving while messages wait).
    seen: Vec<(Option<i64>, Option<Instant>)>,
    healthy: bool,
}

/// The task that judges the shards of sharder `stage` until it is stopped.
pub(crate) fn watch_shards(
    stage: &StageSpec,
    config: &SharderConfig,
    health: Arc<ShardHealth>,
    ctx: &BuildContext<'_>,
) -> impl Future<Output = ()> + Send + 'static {
    let prefix = &ctx.config.bus.topic_prefix;
    let shards: Vec<Shard> = (0..config.shards)
        .filter_map(|index| {
            let port = format!("shard-{index}");
            let topic = stage.outputs.get(&port)?;
            let groups = ctx
                .topology
                .readers(topic)
                .map(|r| format!("{prefix}{}", r.name))
                .collect::<Vec<_>>();
            Some(Shard {
                index,
                port,
                topic: format!("{prefix}{topic}"),
                seen: vec![(None, None); groups.len()],
                groups,
                healthy: true,
            })
        })
        .collect();
    let after = Duration::from_secs(config.unhealthy_after_secs.max(1));
    let watch = Watch {
        stage: stage.name.clone(),
        bus: ctx.services.bus.clone(),
        metrics: ctx.services.metrics.clone(),
        health,
        after,
    };
    watch.run(shards)
}

struct Watch {
    stage: String,
    bus: Bus,
    metrics: Metrics,
    health: Arc<ShardHealth>,
    after: Duration,
}

impl Watch {
    async fn run(self, mut shards: Vec<Shard>) {
        for shard in &shards {
            self.metrics.shard_healthy(&self.stage, &shard.port, true);
        }
        let mut tick = tokio::time::interval(
            (self.after / 4).clamp(Duration::from_millis(250), Duration::from_secs(5)),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for shard in &mut shards {
                match self.judge(shard).await {
                    Ok(healthy) => self.decide(shard, healthy),
                    // Blind: keep the last decision.
                    Err(e) => {
                        tracing::debug!(stage = %self.stage, shard = %shard.port, error = %e, "cannot judge the shard")
                    }
                }
            }
        }
    }

    /// Whether every stage reading the shard has had a consumer that keeps up, give or take
    /// `after`: a group that has looked bad for that long makes the shard unhealthy; one that
    /// looks good again makes it healthy at once.
    async fn judge(&self, shard: &mut Shard) -> Result<bool, mediaflow_bus::BusError> {
        let now = Instant::now();
        let mut healthy = true;
        for (group, (last, bad_since)) in shard.groups.iter().zip(shard.seen.iter_mut()) {
            let positions = self
                .bus
                .group_positions(group, std::slice::from_ref(&shard.topic))
                .await?;
            let committed: i64 = positions.iter().map(|p| p.committed.unwrap_or(p.low)).sum();
            let lag: i64 = positions
                .iter()
                .map(mediaflow_bus::PartitionPosition::lag)
                .sum();
            let members = self.bus.group_members(group).await?;
            let stuck = lag > 0 && *last == Some(committed);
            *last = Some(committed);
            if members == 0 || stuck {
                let since = *bad_since.get_or_insert(now);
                if now.duration_since(since) >= self.after {
                    healthy = false;
                }
            } else {
                *bad_since = None;
            }
        }
        Ok(healthy)
    }

    fn decide(&self, shard: &mut Shard, healthy: bool) {
        if shard.healthy == healthy {
            return;
        }
        shard.healthy = healthy;
        self.health.set(shard.index, healthy);
        self.metrics
            .shard_healthy(&self.stage, &shard.port, healthy);
        if healthy {
            tracing::info!(stage = %self.stage, shard = %shard.port, topic = %shard.topic, "shard healthy again; its keys return to it");
        } else {
            tracing::warn!(stage = %self.stage, shard = %shard.port, topic = %shard.topic, groups = ?shard.groups, "shard unhealthy (no consumer, or stuck with messages waiting); routing its keys to the next shards on the ring");
        }
    }
}
