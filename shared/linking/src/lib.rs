//! The linking stages of ch. 11 (copier, filter, splitter, sharder, merger). Their declarations
//! (settings, ports) live in `mediaflow-pipeline`; this crate holds what they do: `ring`, the
//! sharder's consistent hashing as a pure core, and `stages`, their handlers on the runtime.

pub mod ring;
pub mod stages;
