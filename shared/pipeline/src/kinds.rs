//! The linking kinds of ch. 11 as declared in a pipeline file: each kind's settings
//! (`<Kind>Config`, unknown fields refused) and the ports it needs. What they do at run time is
//! the runtime's business; here is what makes a declaration of one valid.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::check::{KindCatalog, Problem};
use crate::decl::{At, StageDecl};
use crate::expr::Expr;

/// copier: every event to every output port.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopierConfig {}

/// filter: the events its predicate holds for, on port `out`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// CEL over the event (`data`, `type`, `subject`, `source`, `id`).
    pub predicate: String,
}

/// splitter: each event to every port whose predicate holds, else to `default`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitterConfig {
    /// Port -> CEL predicate.
    pub routes: BTreeMap<String, String>,
    /// The port for events no route takes; without one they are dropped (and counted).
    pub default: Option<String>,
}

/// sharder: each event to one of `shards` ports (`shard-0` ...), by consistent hashing of
/// its key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharderConfig {
    /// CEL giving the key, e.g. `subject` or `data.user.zone`.
    pub key: String,
    /// How many shards; ports `shard-0` to `shard-<shards - 1>`.
    pub shards: u32,
    /// Seconds a shard may look unhealthy before its keys move to the next shard on the ring.
    #[serde(default = "default_unhealthy_after")]
    pub unhealthy_after_secs: u64,
}

fn default_unhealthy_after() -> u64 {
    30
}

/// merger: every input onto port `out`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergerConfig {}

/// The linking kinds: `copier`, `filter`, `splitter`, `sharder`, `merger`.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinkingKinds;

const LINKING: [&str; 5] = ["copier", "filter", "splitter", "sharder", "merger"];

/// Reads a kind's settings; a stage without `config` gets the kind's defaults if it has them.
pub fn settings<T: serde::de::DeserializeOwned>(stage: &StageDecl) -> Result<T, Problem> {
    let value = match stage.config_value() {
        serde_json::Value::Null => serde_json::Value::Object(Default::default()),
        v => v.clone(),
    };
    serde_json::from_value(value).map_err(|e| {
        Problem::at(
            stage.config_at(),
            format!(
                "stage `{}`: settings of a {}: {e}",
                stage.name.value, stage.kind.value
            ),
        )
    })
}

fn expression(stage: &StageDecl, what: &str, source: &str) -> Option<Problem> {
    Expr::compile(source).err().map(|e| {
        Problem::at(
            stage.config_at(),
            format!("stage `{}`: {what}: {e}", stage.name.value),
        )
    })
}

/// Problems with a stage's ports: `needed` must all be bound, and (unless `extra_allowed`)
/// nothing else may be.
pub fn ports(stage: &StageDecl, needed: &[String], extra_allowed: bool) -> Vec<Problem> {
    let name = &stage.name.value;
    let mut problems = Vec::new();
    for port in needed {
        if !stage.outputs.contains_key(port) {
            problems.push(Problem::at(
                At::of(&stage.kind),
                format!(
                    "stage `{name}`: port `{port}` is bound to nothing (add it under `outputs`)"
                ),
            ));
        }
    }
    if !extra_allowed {
        for (port, topic) in &stage.outputs {
            if !needed.contains(port) {
                problems.push(Problem::at(
                    At::of(topic),
                    format!(
                        "stage `{name}`: a {} has no port `{port}` (its ports: {})",
                        stage.kind.value,
                        needed.join(", ")
                    ),
                ));
            }
        }
    }
    problems
}

impl KindCatalog for LinkingKinds {
    fn kinds(&self) -> Vec<String> {
        LINKING.iter().map(|k| (*k).to_owned()).collect()
    }

    fn check(&self, stage: &StageDecl) -> Option<Vec<Problem>> {
        let name = &stage.name.value;
        let out = vec!["out".to_owned()];
        let problems = match stage.kind.value.as_str() {
            "copier" => match settings::<CopierConfig>(stage) {
                Err(p) => vec![p],
                Ok(_) if stage.outputs.is_empty() => vec![Problem::at(
                    At::of(&stage.kind),
                    format!("stage `{name}`: a copier needs at least one output port"),
                )],
                Ok(_) => vec![],
            },
            "filter" => match settings::<FilterConfig>(stage) {
                Err(p) => vec![p],
                Ok(c) => expression(stage, "predicate", &c.predicate)
                    .into_iter()
                    .chain(ports(stage, &out, false))
                    .collect(),
            },
            "splitter" => match settings::<SplitterConfig>(stage) {
                Err(p) => vec![p],
                Ok(c) => {
                    let mut needed: Vec<String> = c.routes.keys().cloned().collect();
                    needed.extend(c.default.iter().cloned());
                    let mut problems: Vec<Problem> = c
                        .routes
                        .iter()
                        .filter_map(|(port, p)| expression(stage, &format!("route `{port}`"), p))
                        .collect();
                    if c.routes.is_empty() {
                        problems.push(Problem::at(
                            stage.config_at(),
                            format!("stage `{name}`: a splitter needs at least one route"),
                        ));
                    }
                    problems.extend(ports(stage, &needed, false));
                    problems
                }
            },
            "sharder" => match settings::<SharderConfig>(stage) {
                Err(p) => vec![p],
                Ok(c) if c.shards == 0 => vec![Problem::at(
                    stage.config_at(),
                    format!("stage `{name}`: a sharder needs at least one shard"),
                )],
                Ok(c) => {
                    let needed: Vec<String> = (0..c.shards).map(|i| format!("shard-{i}")).collect();
                    expression(stage, "key", &c.key)
                        .into_iter()
                        .chain(ports(stage, &needed, false))
                        .collect()
                }
            },
            "merger" => match settings::<MergerConfig>(stage) {
                Err(p) => vec![p],
                Ok(_) => {
                    let mut problems = ports(stage, &out, false);
                    if stage.inputs.value.len() < 2 {
                        problems.push(Problem::at(
                            At::of(&stage.inputs),
                            format!("stage `{name}`: a merger reads two or more topics"),
                        ));
                    }
                    problems
                }
            },
            _ => return None,
        };
        Some(problems)
    }
}

/// Several catalogs as one: the first that knows a kind checks it.
pub struct Catalogs<'a>(pub Vec<&'a dyn KindCatalog>);

impl KindCatalog for Catalogs<'_> {
    fn kinds(&self) -> Vec<String> {
        self.0.iter().flat_map(|c| c.kinds()).collect()
    }

    fn check(&self, stage: &StageDecl) -> Option<Vec<Problem>> {
        self.0.iter().find_map(|c| c.check(stage))
    }
}
