//! Pipelines as data: a YAML file declares the topics (name, partitions, retention, key) and the
//! stages (name, kind, version, inputs, output ports bound to topics, concurrency, settings).
//! `load`/`parse` read and check one, reporting every problem with its line and column;
//! `graph` draws it. The stage kinds a platform knows come in through a `KindCatalog`; the
//! linking kinds of ch. 11 (`kinds`) are declared here. No I/O beyond reading the file.

mod check;
mod decl;
pub mod expr;
pub mod graph;
pub mod kinds;

pub use check::{
    KindCatalog, PipelineError, Problem, RESERVED_CONSUMER_PROPERTIES, check, load, parse,
    parse_duration_ms,
};
pub use decl::{At, Pipeline, StageDecl, TopicDecl};
