//! The coordinated stage kinds of ch. 12 (`join`, `reduce`; `mediaflow-coordinator`) as the
//! registry knows them. Each runs its handler beside the relay that publishes what it releases
//! exactly once (the emission ledger); a join also runs its deadline timer.

use std::collections::BTreeMap;

use anyhow::Result;
use mediaflow_coordinator::{Join, JoinConfig, Reduce, ReduceConfig, Relay};
use mediaflow_pipeline::{Problem, StageDecl};

use crate::platform::StageSpec;
use crate::registry::{BuildContext, Built, Kind, declared};

/// The stage's relay, publishing as `/mediaflow/<stage>`.
fn relay(stage: &StageSpec, ctx: &BuildContext<'_>) -> Relay {
    let s = ctx.services;
    Relay::new(
        &stage.name,
        s.db.clone(),
        s.bus.clone(),
        s.publisher
            .with_source(&format!("/mediaflow/{}", stage.name)),
        s.metrics.clone(),
        std::time::Duration::from_secs(ctx.config.stages.emission_lease_secs.max(1)),
        ctx.tracker.clone(),
    )
}

/// The stage's ports bound to their topics (under the topic prefix).
fn topics(stage: &StageSpec, ctx: &BuildContext<'_>) -> BTreeMap<String, String> {
    let prefix = &ctx.config.bus.topic_prefix;
    stage
        .outputs
        .iter()
        .map(|(port, topic)| (port.clone(), format!("{prefix}{topic}")))
        .collect()
}

/// A barrier per media (`by: media`, over declared `branches`) or per batch (`by: batch`).
/// Port `out`: `mediaflow.media.completed` / `mediaflow.batch.completed`.
pub struct JoinKind;

impl Kind for JoinKind {
    fn name(&self) -> &str {
        "join"
    }

    fn check(&self, stage: &StageDecl) -> Vec<Problem> {
        declared::<JoinConfig>(stage, JoinConfig::check, |_| vec!["out".to_owned()])
    }

    fn build(&self, stage: &StageSpec, ctx: &BuildContext<'_>) -> Result<Built> {
        let config = stage.settings::<JoinConfig>()?;
        config.check().map_err(anyhow::Error::msg)?;
        let out = topics(stage, ctx)
            .remove("out")
            .ok_or_else(|| anyhow::anyhow!("stage `{}`: port `out` is unbound", stage.name))?;
        let relay = relay(stage, ctx);
        let s = ctx.services;
        let join = Join::new(
            &stage.name,
            config,
            &out,
            s.db.clone(),
            s.store.clone(),
            s.metrics.clone(),
            relay.clone(),
        );
        let timer = join.clone().tick();
        Ok(Built::handler(join).alongside(relay.run()).alongside(timer))
    }
}

/// Counts, sums and histograms per batch or per window (`aggregates`), or a root merging
/// other reducers' reports (`merge`). Ports `out` (`mediaflow.report`) and, windowed, `late`.
pub struct ReduceKind;

impl Kind for ReduceKind {
    fn name(&self) -> &str {
        "reduce"
    }

    fn check(&self, stage: &StageDecl) -> Vec<Problem> {
        declared::<ReduceConfig>(stage, ReduceConfig::check, ReduceConfig::ports)
    }

    fn build(&self, stage: &StageSpec, ctx: &BuildContext<'_>) -> Result<Built> {
        let config = stage.settings::<ReduceConfig>()?;
        config.check().map_err(anyhow::Error::msg)?;
        let relay = relay(stage, ctx);
        let s = ctx.services;
        let reduce = Reduce::new(
            &stage.name,
            config,
            topics(stage, ctx),
            s.db.clone(),
            s.metrics.clone(),
            relay.clone(),
        );
        Ok(Built::handler(reduce).alongside(relay.run()))
    }
}
