//! From the pipeline files to what runs: the declared stages (the configured `pipeline`
//! files, else the two that ship with mediaflow) plus the `[[exec]]` shorthand of the configuration,
//! each checked by its kind, every name unique; and the topics to create. A wrong file stops
//! start-up before anything starts, with the file, line and problem.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mediaflow_events::TopicSpec;
use mediaflow_pipeline::Pipeline;
use serde::de::DeserializeOwned;

use crate::MediaflowConfig;
use crate::registry::Registry;

/// The upload pipeline `mediaflow up` runs when no `pipeline` file is configured.
pub const DEFAULT_PIPELINE: &str = include_str!("../../../../pipelines/default.yaml");

/// The sign-up flow `mediaflow up` runs beside it.
pub const SIGNUP_PIPELINE: &str = include_str!("../../../../pipelines/signup.yaml");

/// The book's image tagging pipeline (ch. 12), on batch uploads.
pub const TAGGING_PIPELINE: &str = include_str!("../../../../pipelines/tagging.yaml");

/// What runs when no `pipeline` file is configured.
pub const SHIPPED_PIPELINES: [(&str, &str); 3] = [
    ("pipelines/default.yaml", DEFAULT_PIPELINE),
    ("pipelines/signup.yaml", SIGNUP_PIPELINE),
    ("pipelines/tagging.yaml", TAGGING_PIPELINE),
];

/// The name the gateway runs under (`mediaflow run gateway`); no stage may take it.
pub const GATEWAY: &str = "gateway";

/// How long a declared topic keeps messages when its declaration does not say.
const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A stage to run, as declared (topic names without the prefix).
#[derive(Clone, Debug)]
pub struct StageSpec {
    pub name: String,
    pub kind: String,
    pub version: u32,
    pub inputs: Vec<String>,
    /// Output port -> topic.
    pub outputs: BTreeMap<String, String>,
    /// Messages in flight at once; `stages.concurrency` when unset.
    pub concurrency: Option<usize>,
    /// librdkafka properties of its consumer, over `bus.librdkafka`.
    pub consumer: BTreeMap<String, String>,
    /// The kind's settings (`null` when none were given).
    pub config: serde_json::Value,
}

impl StageSpec {
    /// The kind's settings; a stage without any gets the settings' defaults.
    pub fn settings<T: DeserializeOwned>(&self) -> Result<T> {
        let value = match &self.config {
            serde_json::Value::Null => serde_json::Value::Object(Default::default()),
            v => v.clone(),
        };
        serde_json::from_value(value)
            .with_context(|| format!("settings of stage `{}` ({})", self.name, self.kind))
    }

    /// The kind's settings, or `fallback` when the stage has none.
    pub fn settings_or<T: DeserializeOwned + Clone>(&self, fallback: &T) -> Result<T> {
        match self.config {
            serde_json::Value::Null => Ok(fallback.clone()),
            _ => self.settings(),
        }
    }
}

/// Every stage and topic of the running pipeline.
#[derive(Clone, Debug)]
pub struct Topology {
    /// Where the declaration came from, for messages.
    pub file: String,
    pub stages: Vec<StageSpec>,
    /// Declared topics: name (without prefix), partitions (None: `bus.partitions`), retention.
    topics: Vec<(String, Option<i32>, Duration)>,
}

impl Topology {
    /// Reads and checks the configured pipeline files (or the shipped ones) and adds the
    /// `[[exec]]` stages of `config`. Several files run as one pipeline: their stage names
    /// must differ, and a topic two of them declare must be declared alike.
    pub fn load(config: &MediaflowConfig, registry: &Registry) -> Result<Self> {
        let sources: Vec<(String, String)> = match &config.pipeline {
            Some(pipelines) => pipelines
                .files()
                .iter()
                .map(|path| {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading pipeline file {}", path.display()))?;
                    Ok((path.display().to_string(), text))
                })
                .collect::<Result<_>>()?,
            None => SHIPPED_PIPELINES
                .iter()
                .map(|(name, text)| (format!("the shipped {name}"), (*text).to_owned()))
                .collect(),
        };
        if sources.is_empty() {
            bail!("`pipeline` names no file");
        }
        let mut topology: Option<Self> = None;
        for (file, text) in sources {
            let pipeline = mediaflow_pipeline::parse(&text, &file, registry)?;
            let next = Self::declared(file, &pipeline);
            topology = Some(match topology {
                None => next,
                Some(t) => t.join(next)?,
            });
        }
        let mut topology = topology.expect("at least one pipeline file");
        for exec in &config.exec {
            topology.stages.push(exec_stage(exec)?);
        }
        topology.check_names(config)?;
        Ok(topology)
    }

    /// This pipeline and `other` run as one.
    fn join(mut self, other: Self) -> Result<Self> {
        for topic in other.topics {
            match self.topics.iter().find(|t| t.0 == topic.0) {
                Some(mine) if *mine != topic => bail!(
                    "topic `{}` is declared differently in {} and {}",
                    topic.0,
                    self.file,
                    other.file
                ),
                Some(_) => {}
                None => self.topics.push(topic),
            }
        }
        self.stages.extend(other.stages);
        self.file = format!("{} and {}", self.file, other.file);
        Ok(self)
    }

    fn declared(file: String, pipeline: &Pipeline) -> Self {
        let stages = pipeline
            .stages
            .iter()
            .map(|s| StageSpec {
                name: s.name.value.clone(),
                kind: s.kind.value.clone(),
                version: s.version.value,
                inputs: s.input_names().map(str::to_owned).collect(),
                outputs: s
                    .outputs
                    .iter()
                    .map(|(port, topic)| (port.clone(), topic.value.clone()))
                    .collect(),
                concurrency: s.concurrency.as_ref().map(|c| c.value),
                consumer: s
                    .consumer
                    .iter()
                    .map(|(k, v)| (k.clone(), v.value.clone()))
                    .collect(),
                config: s.config_value().clone(),
            })
            .collect();
        let topics = pipeline
            .topics
            .iter()
            .map(|t| {
                // The check has already refused retentions it cannot read.
                let retention = t
                    .retention
                    .as_ref()
                    .and_then(|r| mediaflow_pipeline::parse_duration_ms(&r.value))
                    .map_or(DEFAULT_RETENTION, Duration::from_millis);
                (
                    t.name.value.clone(),
                    t.partitions.as_ref().map(|p| p.value),
                    retention,
                )
            })
            .collect();
        Self {
            file,
            stages,
            topics,
        }
    }

    /// Stage, source and gateway names are unique; `stages.enabled` names only known ones.
    fn check_names(&self, config: &MediaflowConfig) -> Result<()> {
        let mut seen = BTreeSet::from([GATEWAY.to_owned()]);
        for name in self.runnable(config) {
            if !seen.insert(name.clone()) {
                bail!(
                    "stage name `{name}` is used twice (in {}, `[[exec]]` and `[[http_source]]`; `gateway` is taken)",
                    self.file
                );
            }
        }
        if let Some(unknown) = config
            .stages
            .enabled
            .iter()
            .flatten()
            .find(|s| !seen.contains(*s))
        {
            bail!(
                "stages.enabled names unknown stage `{unknown}`; stages: {}",
                self.runnable(config).join(", ")
            );
        }
        Ok(())
    }

    /// Every stage and source that runs under `config`, by name.
    pub fn runnable(&self, config: &MediaflowConfig) -> Vec<String> {
        self.stages
            .iter()
            .map(|s| s.name.clone())
            .chain(config.http_source.iter().map(|s| s.name.clone()))
            .collect()
    }

    pub fn stage(&self, name: &str) -> Option<&StageSpec> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// The stages an upload is queued for: those reading `media.uploaded`.
    pub fn upload_stages(&self) -> Vec<String> {
        self.readers("media.uploaded")
            .map(|s| s.name.clone())
            .collect()
    }

    /// Whether the pipeline declares `topic`.
    pub fn declares(&self, topic: &str) -> bool {
        self.topics.iter().any(|t| t.0 == topic)
    }

    /// The stages that read `topic`.
    pub fn readers<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a StageSpec> + 'a {
        self.stages
            .iter()
            .filter(move |s| s.inputs.iter().any(|i| i == topic))
    }

    /// The declared topics as created: under `prefix`, `partitions` when they do not say.
    pub fn topic_specs(&self, prefix: &str, partitions: i32) -> Vec<TopicSpec> {
        self.topics
            .iter()
            .map(|(name, p, retention)| TopicSpec {
                name: format!("{prefix}{name}"),
                partitions: p.unwrap_or(partitions),
                retention: *retention,
            })
            .collect()
    }
}

/// An `[[exec]]` entry of the configuration as a declared stage: it reads its `input_topic`
/// and its port `out` goes to `items.processed` for work items, else `media.processed`.
fn exec_stage(exec: &mediaflow_exec_worker::ExecWorkerConfig) -> Result<StageSpec> {
    if exec.name.is_empty() {
        bail!("an `[[exec]]` stage has no `name`");
    }
    let version = exec.version.parse().with_context(|| {
        format!(
            "exec stage `{}`: version `{}` is not a whole number",
            exec.name, exec.version
        )
    })?;
    let out = if exec.input_topic == "jobs.items" {
        "items.processed"
    } else {
        "media.processed"
    };
    let mut config = serde_json::to_value(exec)?;
    if let Some(map) = config.as_object_mut() {
        map.remove("name");
        map.remove("input_topic");
    }
    Ok(StageSpec {
        name: exec.name.clone(),
        kind: "exec".into(),
        version,
        inputs: vec![exec.input_topic.clone()],
        outputs: BTreeMap::from([("out".to_owned(), out.to_owned())]),
        concurrency: None,
        consumer: BTreeMap::new(),
        config,
    })
}
