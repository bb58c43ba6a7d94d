//! The coordinated stage kinds of ch. 12, on the stage runtime:
//!
//! - [`join::Join`]: a barrier per media (its declared branches) or per batch (its items),
//!   releasing `mediaflow.media.completed` / `mediaflow.batch.completed` once;
//! - [`reduce::Reduce`]: mergeable partial aggregates per batch or per event-time window,
//!   reporting `mediaflow.report` once per group, late inputs to a visible topic, leaves merged by
//!   a root;
//! - [`ledger`]: what both release is recorded in the transaction that decided it and published
//!   by a [`ledger::Relay`] exactly once, on a broker without transactions.
//!
//! The pure cores (barrier, partials, windows) are `mediaflow-coordination`; here is their state
//! in the database and their delivery. Handlers publish nothing through the runtime: every output
//! goes through the ledger, so an input delivered again (after a crash, or produced twice) emits
//! nothing new.

pub mod join;
pub mod ledger;
pub mod reduce;

pub use join::{Join, JoinConfig};
pub use ledger::{Emission, Relay};
pub use reduce::{Reduce, ReduceConfig};

use mediaflow_runtime::StageError;

/// A database failure as a stage error: transient when a retry can succeed.
pub(crate) fn db_error(e: sqlx::Error) -> StageError {
    let e = mediaflow_db::DbError::from(e);
    StageError::dependency(e.is_transient(), e.to_string())
}

pub(crate) fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
