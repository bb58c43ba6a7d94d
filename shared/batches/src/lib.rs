//! Batches (ch. 12): media that complete together. `spec` validates what a client asks for (a
//! name, an item count or a manifest of names, a failure policy, a timeout); `store` (`Batches`)
//! owns the queries of `batches` and `batch_items`: creating a batch, an upload taking one of its
//! items (one conditional statement, so concurrent uploads cannot overfill it or take a name
//! twice), giving an item back when its upload fails, and progress per stage.

pub mod spec;
pub mod store;

pub use spec::{BatchRequest, BatchSpec, SpecError};
pub use store::{BatchRow, Batches, BatchesError, Progress, StageProgress, Take};
