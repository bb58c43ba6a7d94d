//! The declaration as written in a pipeline file: topics, and stages reading topics and writing
//! their output ports to topics. Every value a check can complain about keeps its line and
//! column.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

/// A pipeline file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Every topic the pipeline reads or writes, declared once.
    #[serde(default)]
    pub topics: Vec<TopicDecl>,
    /// The stages, each reading topics and writing its output ports to topics.
    #[serde(default)]
    pub stages: Vec<StageDecl>,
}

/// A topic, created at start-up as declared.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicDecl {
    /// The name, under the configured topic prefix.
    pub name: Spanned<String>,
    /// Partitions; the bus default (`bus.partitions`) when unset.
    pub partitions: Option<Spanned<i32>>,
    /// How long messages are kept (`retention.ms`), e.g. `7d`, `12h`, `30m`; the broker's default
    /// when unset.
    pub retention: Option<Spanned<String>>,
    /// What the partition key is, for readers of the file (e.g. `media id`).
    pub key: Option<String>,
    /// Who writes it from outside the declared stages (the gateway, a source, another system).
    /// A topic stages read must be written by a stage or say who writes it.
    pub produced_by: Option<String>,
}

/// A stage: one kind of work on its inputs, with its outputs bound to topics by port.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageDecl {
    /// Unique in the pipeline; also the consumer group (under the topic prefix).
    pub name: Spanned<String>,
    /// What the stage does: a kind the platform knows (`copier`, `filter`, `image`, ...).
    pub kind: Spanned<String>,
    /// The stage's version: part of output keys and event ids, so a new version makes new
    /// outputs instead of overwriting the old ones.
    #[serde(default = "first_version")]
    pub version: Spanned<u32>,
    /// The topics it reads.
    pub inputs: Spanned<Vec<Spanned<String>>>,
    /// Output port -> topic.
    #[serde(default)]
    pub outputs: BTreeMap<String, Spanned<String>>,
    /// Messages in flight at once in one instance; `stages.concurrency` when unset.
    pub concurrency: Option<Spanned<usize>>,
    /// librdkafka properties of the stage's consumer, over `bus.librdkafka` (a batch stage's
    /// longer `fetch.wait.max.ms`, say). The ones the runtime's delivery rests on are refused
    /// (`RESERVED_CONSUMER_PROPERTIES`).
    #[serde(default)]
    pub consumer: BTreeMap<String, Spanned<String>>,
    /// For a stage on a cycle: how many times one event may pass through it. A cycle needs one
    /// stage with a bound.
    pub max_passes: Option<Spanned<u32>>,
    /// The kind's own settings.
    pub config: Option<Spanned<serde_json::Value>>,
}

fn first_version() -> Spanned<u32> {
    Spanned::new(
        1,
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    )
}

/// A line and column in the pipeline file (1-based; 0 when unknown).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct At {
    pub line: u64,
    pub column: u64,
}

impl At {
    pub fn of<T>(spanned: &Spanned<T>) -> Self {
        Self::from_location(spanned.referenced)
    }

    pub(crate) fn from_location(l: serde_saphyr::Location) -> Self {
        if l == serde_saphyr::Location::UNKNOWN {
            Self::default()
        } else {
            Self {
                line: l.line(),
                column: l.column(),
            }
        }
    }
}

impl StageDecl {
    /// Where the stage's settings are, or its kind when it has none: where a kind's complaints
    /// about the stage point.
    pub fn config_at(&self) -> At {
        self.config
            .as_ref()
            .map_or_else(|| At::of(&self.kind), At::of)
    }

    /// The stage's settings, `null` when it has none.
    pub fn config_value(&self) -> &serde_json::Value {
        self.config
            .as_ref()
            .map_or(&serde_json::Value::Null, |c| &c.value)
    }

    /// Its input topic names.
    pub fn input_names(&self) -> impl Iterator<Item = &str> {
        self.inputs.value.iter().map(|i| i.value.as_str())
    }
}
