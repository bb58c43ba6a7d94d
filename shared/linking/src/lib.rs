//! The linking stages of ch. 11 (copier, filter, splitter, sharder, merger). Their declarations
//! live in `mediaflow-pipeline`; this crate holds what they compute, as pure code: `ring`, the
//! sharder's consistent hashing.

pub mod ring;
