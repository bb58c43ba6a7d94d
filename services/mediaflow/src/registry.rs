//! The stage kinds a platform knows, by name: the linking kinds of ch. 11, the media stages,
//! exec, and chains of reusable workers (ch. 10). A kind checks a declared stage (its settings and ports, for `mediaflow pipeline check`
//! and start-up) and builds its handler; the platform runs the handler on the stage runtime,
//! its ports bound to the declared topics. A kind of one's own is added with `Registry::with`
//! (README, "Writing a stage kind").

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Result;
use futures::future::BoxFuture;
use mediaflow_chain_worker::{Chain, ChainConfig, Workers};
use mediaflow_exec_worker::{ExecWorker, ExecWorkerConfig};
use mediaflow_image_worker::{ImageWorker, ImageWorkerConfig};
use mediaflow_linking::stages::{Copier, Filter, Merger, ShardHealth, Sharder, Splitter};
use mediaflow_pipeline::kinds::{
    FilterConfig, LinkingKinds, SharderConfig, SplitterConfig, ports, settings,
};
use mediaflow_pipeline::{KindCatalog, Problem, StageDecl};
use mediaflow_redact_worker::{RedactConfig, RedactWorker};
use mediaflow_runtime::{Handler, Stopped};
use mediaflow_video_worker::{VideoWorker, VideoWorkerConfig};

use crate::MediaflowConfig;
use crate::platform::{Services, StageSpec, Topology, Wiring, consume, watch_shards};

/// A kind of stage: what a declaration of it must hold, and how its handler is made.
pub trait Kind: Send + Sync + 'static {
    /// The name pipeline files use (`kind: <name>`).
    fn name(&self) -> &str;

    /// Problems with a declared stage of this kind: its settings and its ports.
    fn check(&self, stage: &StageDecl) -> Vec<Problem>;

    /// Builds the stage declared as `stage` (already checked).
    fn build(&self, stage: &StageSpec, ctx: &BuildContext<'_>) -> Result<Built>;

    /// Messages a stage of this kind has in flight when its declaration does not say;
    /// `stages.concurrency` when None.
    fn concurrency(&self) -> Option<usize> {
        None
    }
}

/// What a kind can use to build a stage.
pub struct BuildContext<'a> {
    pub config: &'a MediaflowConfig,
    pub services: &'a Services,
    pub topology: &'a Topology,
    /// Where stages record their state per media item: a kind that publishes beside the runtime
    /// (the joins' and reducers' relays) queues the readers of what it publishes here first.
    pub tracker: &'a Arc<dyn mediaflow_runtime::Tracker>,
}

type Run = Box<dyn FnOnce(Wiring) -> BoxFuture<'static, Result<Stopped>> + Send>;

/// A built stage: its handler on the stage runtime, and tasks that run beside it while it runs
/// (a sharder's health watch).
pub struct Built {
    run: Run,
    alongside: Vec<BoxFuture<'static, ()>>,
}

impl Built {
    /// `handler` run on the stage runtime.
    pub fn handler<H: Handler>(handler: H) -> Self {
        Self {
            run: Box::new(move |wiring| Box::pin(consume(handler, wiring))),
            alongside: Vec::new(),
        }
    }

    /// With `task` running beside the stage; it is stopped when the stage stops.
    pub fn alongside(mut self, task: impl Future<Output = ()> + Send + 'static) -> Self {
        self.alongside.push(Box::pin(task));
        self
    }

    pub(crate) async fn run(self, wiring: Wiring) -> Result<Stopped> {
        let beside: Vec<_> = self.alongside.into_iter().map(tokio::spawn).collect();
        let stopped = (self.run)(wiring).await;
        for task in beside {
            task.abort();
        }
        stopped
    }
}

/// Kinds by name.
#[derive(Clone)]
pub struct Registry {
    kinds: BTreeMap<String, Arc<dyn Kind>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.kinds.keys()).finish()
    }
}

impl Default for Registry {
    /// Every kind the platform ships: copier, filter, splitter, sharder, merger, image, video,
    /// exec, chain (with the shipped workers), the sign-up flow's mail, webhook, register
    /// and sms, the coordinated join and reduce, and redact (detect and blur).
    fn default() -> Self {
        let empty = Self {
            kinds: BTreeMap::new(),
        };
        LinkingKinds
            .kinds()
            .into_iter()
            .fold(empty, |r, k| r.with(Linking(k)))
            .with(Image)
            .with(Video)
            .with(Exec)
            .with(ChainKind::new(Workers::default()))
            .with(crate::signup::MailKind)
            .with(crate::signup::WebhookKind)
            .with(crate::signup::RegisterKind)
            .with(crate::signup::SmsKind)
            .with(crate::coordinated::JoinKind)
            .with(crate::coordinated::ReduceKind)
            .with(Redact)
    }
}

impl Registry {
    /// This registry with `kind` added (replacing a kind of the same name).
    pub fn with(mut self, kind: impl Kind) -> Self {
        self.kinds.insert(kind.name().to_owned(), Arc::new(kind));
        self
    }

    pub fn kind(&self, name: &str) -> Option<&Arc<dyn Kind>> {
        self.kinds.get(name)
    }
}

impl KindCatalog for Registry {
    fn kinds(&self) -> Vec<String> {
        self.kinds.keys().cloned().collect()
    }

    fn check(&self, stage: &StageDecl) -> Option<Vec<Problem>> {
        self.kind(&stage.kind.value).map(|k| k.check(stage))
    }
}

/// Ports `out` only: the media and exec kinds.
fn out_only(stage: &StageDecl, settings_problem: Option<Problem>) -> Vec<Problem> {
    settings_problem
        .into_iter()
        .chain(ports(stage, &["out".to_owned()], false))
        .collect()
}

/// A media kind's declaration: settings of type `T` if it gives any (else the configuration's
/// apply), which `check` accepts, and port `out` only.
fn media_check<T: serde::de::DeserializeOwned>(
    stage: &StageDecl,
    check: impl FnOnce(&T) -> Result<(), String>,
) -> Vec<Problem> {
    let problem = match stage.config_value() {
        serde_json::Value::Null => None,
        _ => match settings::<T>(stage) {
            Ok(c) => check(&c).err().map(|e| {
                Problem::at(
                    stage.config_at(),
                    format!("stage `{}`: {e}", stage.name.value),
                )
            }),
            Err(p) => Some(p),
        },
    };
    out_only(stage, problem)
}

/// A declaration's settings of type `T`, checked by `check`, and the ports `needed` gives
/// for them (no others allowed).
pub(crate) fn declared<T: serde::de::DeserializeOwned>(
    stage: &StageDecl,
    check: impl FnOnce(&T) -> Result<(), String>,
    needed: impl FnOnce(&T) -> Vec<String>,
) -> Vec<Problem> {
    match settings::<T>(stage) {
        Err(p) => vec![p],
        Ok(c) => check(&c)
            .err()
            .map(|e| {
                Problem::at(
                    stage.config_at(),
                    format!("stage `{}`: {e}", stage.name.value),
                )
            })
            .into_iter()
            .chain(ports(stage, &needed(&c), false))
            .collect(),
    }
}

/// A linking kind of ch. 11; `LinkingKinds` checks its declaration.
struct Linking(String);

impl Kind for Linking {
    fn name(&self) -> &str {
        &self.0
    }

    fn check(&self, stage: &StageDecl) -> Vec<Problem> {
        LinkingKinds.check(stage).unwrap_or_default()
    }

    fn concurrency(&self) -> Option<usize> {
        Some(mediaflow_linking::stages::CONCURRENCY)
    }

    fn build(&self, stage: &StageSpec, ctx: &BuildContext<'_>) -> Result<Built> {
        let metrics = ctx.services.metrics.clone();
        let name = &stage.name;
        let invalid = |e: String| anyhow::anyhow!("stage `{name}`: {e}");
        Ok(match self.0.as_str() {
            "copier" => Built::handler(Copier::new(stage.outputs.keys().cloned())),
            "filter" => Built::handler(
                Filter::new(name, &stage.settings::<FilterConfig>()?, metrics).map_err(invalid)?,
            ),
            "splitter" => Built::handler(
                Splitter::new(name, &stage.settings::<SplitterConfig>()?, metrics)
                    .map_err(invalid)?,
            ),
            "sharder" => {
                let config = stage.settings::<SharderConfig>()?;
                let health = ShardHealth::new(config.shards);
                let sharder = Sharder::new(&config, health.clone()).map_err(invalid)?;
                let watch = watch_shards(stage, &config, health, ctx);
                Built::handler(sharder).alongside(watch)
            }
            "merger" => Built::handler(Merger),
            other => anyhow::bail!("`{other}` is not a linking kind"),
        })
    }
}

/// The image stage: renditions and tags. Its settings are the stage's `config`, else
/// `[image_worker]` of the configuration.
struct Image;

impl Kind for Image {
    fn name(&self) -> &str {
        "image"
    }

    fn check(&self, stage: &StageDecl) -> Vec<Problem> {
        media_check(stage, ImageWorkerConfig::check)
    }

    fn build(&self, stage: &StageSpec, ctx: &BuildContext<'_>) -> Result<Built> {
        let config = stage.settings_or::<ImageWorkerConfig>(&ctx.config.image_worker)?;
        config.check().map_err(anyhow::Error::msg)?;
        let s = ctx.services;
        Ok(Built::handler(ImageWorker::new(
            &stage.name,
            &stage.version.to_string(),
            config,
            s.store.clone(),
            s.db.clone(),
        )))
    }
}

/// The video stage: frames, storyboard, preview. Its settings are the stage's `config`, else
/// `[video_worker]` of the configuration.
struct Video;

impl Kind for Video {
    fn name(&self) -> &str {
        "video"
    }

    fn check(&self, stage: &StageDecl) -> Vec<Problem> {
        media_check(stage, VideoWorkerConfig::check)
    }

    fn build(&self, stage: &StageSpec, ctx: &BuildContext<'_>) -> Result<Built> {
        let config = stage.settings_or::<VideoWorkerConfig>(&ctx.config.video_worker)?;
        config.check().map_err(anyhow::Error::msg)?;
        let s = ctx.services;
        Ok(Built::handler(VideoWorker::new(
            &stage.name,
            &stage.version.to_string(),
            config,
            ctx.config.data_dir.join("video"),
            s.store.clone(),
            s.db.clone(),
        )))
    }
}

/// Detect and blur (faces and licence plates, with OpenCV's Haar cascades): ch. 12's
/// multi-worker stage. Its settings are the stage's `config` (`RedactConfig`).
struct Redact;

impl Kind for Redact {
    fn name(&self) -> &str {
        "redact"
    }

    fn check(&self, stage: &StageDecl) -> Vec<Problem> {
        media_check(stage, RedactConfig::check)
    }

    fn build(&self, stage: &StageSpec, ctx: &BuildContext<'_>) -> Result<Built> {
        let config = stage.settings::<RedactConfig>()?;
        let s = ctx.services;
        let worker = RedactWorker::new(
            &stage.name,
            &stage.version.to_string(),
            config,
            s.store.clone(),
            s.db.clone(),
        )
        .map_err(|e| anyhow::anyhow!("stage `{}`: {e}", stage.name))?;
        Ok(Built::handler(worker))
    }
}

/// A command run on each event (ch. 10's one-shot worker). Settings: `command`, `timeout_secs`,
/// `max_input_bytes`, `max_outputs`, `max_output_bytes` (as `[[exec]]`).
struct Exec;

impl Exec {
    fn settings(stage: &StageSpec) -> Result<ExecWorkerConfig> {
        let mut config = stage.settings::<ExecWorkerConfig>()?;
        config.name.clone_from(&stage.name);
        config.version = stage.version.to_string();
        Ok(config)
    }
}

impl Kind for Exec {
    fn name(&self) -> &str {
        "exec"
    }

    fn check(&self, stage: &StageDecl) -> Vec<Problem> {
        let problem = match settings::<ExecWorkerConfig>(stage) {
            Ok(c) if c.command.is_empty() => Some(Problem::at(
                stage.config_at(),
                format!("stage `{}`: `command` is empty", stage.name.value),
            )),
            Ok(_) => None,
            Err(p) => Some(p),
        };
        out_only(stage, problem)
    }

    fn build(&self, stage: &StageSpec, ctx: &BuildContext<'_>) -> Result<Built> {
        let s = ctx.services;
        Ok(Built::handler(ExecWorker::new(
            Self::settings(stage)?,
            ctx.config.data_dir.join("exec"),
            s.store.clone(),
            s.db.clone(),
        )))
    }
}

/// A chain of reusable workers run in one process on one local copy of the input (ch. 10's
/// aggregator). Settings: `steps` (each a `worker`, optional `name` and `config`),
/// `max_input_bytes`, `image_limits`, `video_limits`. A platform with workers of its own uses
/// `Registry::default().with(ChainKind::new(Workers::default().with(MyWorker)))`.
pub struct ChainKind {
    workers: Workers,
}

impl ChainKind {
    pub fn new(workers: Workers) -> Self {
        Self { workers }
    }
}

impl Kind for ChainKind {
    fn name(&self) -> &str {
        "chain"
    }

    fn check(&self, stage: &StageDecl) -> Vec<Problem> {
        let problem = match settings::<ChainConfig>(stage) {
            Ok(c) => self.workers.steps(&c).err().map(|e| {
                Problem::at(
                    stage.config_at(),
                    format!("stage `{}`: {e}", stage.name.value),
                )
            }),
            Err(p) => Some(p),
        };
        out_only(stage, problem)
    }

    fn build(&self, stage: &StageSpec, ctx: &BuildContext<'_>) -> Result<Built> {
        let s = ctx.services;
        let chain = Chain::new(
            &stage.name,
            &stage.version.to_string(),
            stage.settings::<ChainConfig>()?,
            &self.workers,
            ctx.config.data_dir.join("chain"),
            s.store.clone(),
            s.db.clone(),
        )
        .map_err(|e| anyhow::anyhow!("stage `{}`: {e}", stage.name))?
        .with_metrics(s.metrics.clone());
        Ok(Built::handler(chain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_pipeline_is_valid() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../pipelines");
        let registry = Registry::default();
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let file = path.display().to_string();
            mediaflow_pipeline::parse(&text, &file, &registry)
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            checked += 1;
        }
        assert!(checked >= 2, "{checked} pipeline files");
    }

    #[test]
    fn chain_steps_are_checked_where_they_are_declared() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../../pipelines/chains.yaml");
        let text = std::fs::read_to_string(file).unwrap();
        let registry = Registry::default();
        let bad = text.replace("        - worker: tag\n", "        - worker: tagg\n");
        let err = mediaflow_pipeline::parse(&bad, "bad.yaml", &registry).unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("bad.yaml:")
                && err.contains("step 3")
                && err.contains("unknown worker `tagg`"),
            "{err}"
        );
    }

    #[test]
    fn the_shipped_pipeline_is_valid_and_media_settings_are_checked() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../../pipelines/default.yaml");
        let text = std::fs::read_to_string(file).unwrap();
        let registry = Registry::default();
        mediaflow_pipeline::parse(&text, file, &registry).unwrap();
        let bad = text.replace(
            "    version: 2\n",
            "    version: 2\n    config:\n      max_sidee: 10\n",
        );
        let err = mediaflow_pipeline::parse(&bad, "bad.yaml", &registry).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `max_sidee`"),
            "{err}"
        );
    }
}
