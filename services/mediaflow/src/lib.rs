//! The mediaflow platform as a library: configuration, starting the embedded infrastructure, and
//! running stages. The `mediaflow` binary and the integration tests both drive it through
//! `Platform::start`, so tests exercise exactly what users run.

pub mod backfill;
pub mod batch;
pub mod config;
pub mod coordinated;
pub mod dlq;
pub mod http_source;
mod platform;
pub mod registry;
pub mod samples;
pub mod signup;
pub mod tail;

pub use config::MediaflowConfig;
pub use mediaflow_runtime::Stopped;
pub use platform::{
    DEFAULT_PIPELINE, Endpoints, GATEWAY, Platform, Services, StageSpec, Stopper, Topology, Wiring,
    run_stage, run_stage_in,
};
pub use registry::{BuildContext, Built, Kind, Registry};
