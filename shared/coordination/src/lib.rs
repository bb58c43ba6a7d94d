//! The pure cores of coordinated batch processing (ch. 12): the join's barrier, the reduce's
//! mergeable partial aggregates, and tumbling event-time windows. No I/O; the stages that use
//! them own delivery, state and emission.
//!
//! - [`Barrier`] is one key's join: what it waits for (the branches a pipeline declares, or a
//!   batch's manifest), what arrived, and the one [`Outcome`] it releases under its
//!   [`FailurePolicy`] and deadline, the same whatever the order or repeats of arrivals.
//! - [`Spec`] says what one event contributes ([`Spec::observe`]): a count by key, a sum of a
//!   field, a histogram of a field over declared buckets, or a weighted histogram (the book's
//!   family-size histograms merged by population).
//! - [`Partial`] is a contribution or a merge of many. [`Partial::merge`] is associative and
//!   commutative and exact: numbers are fixed-point integers at a declared scale, parsed from the
//!   JSON text, never binary floating point. Partials merged in any order, or in any tree (leaf
//!   reducers feeding a root), give the same bits.
//! - [`Tumbling`] and [`Watermark`] place events in windows and say when a window is closed and an
//!   event late.

pub mod barrier;
pub mod fixed;
pub mod partial;
pub mod window;

pub use barrier::{Arrival, Barrier, BarrierError, Expected, FailurePolicy, Outcome, Step};
pub use fixed::{Fixed, parse_fixed};
pub use partial::{Partial, Spec};
pub use window::{Tumbling, Watermark, Window};

/// Why an observation or a merge failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AggregateError {
    /// The event lacks the field, or it has the wrong type.
    #[error("field `{field}`: {problem}")]
    Field { field: String, problem: String },
    /// Two partials of different kinds, scales or buckets.
    #[error("cannot merge: {0}")]
    Mismatch(String),
    /// A sum or count outgrew its integer.
    #[error("overflow: {0}")]
    Overflow(String),
}
