//! The vocabulary every mediaflow stage shares: event payloads (media, work items, users), the topics they travel on, and
//! their CloudEvents 1.0 envelope. Pure data: no I/O, no Kafka client.

pub mod batch;
mod dead_letter;
mod envelope;
pub mod item;
pub mod media;
#[cfg(any(test, feature = "validate"))]
pub mod schema;
pub mod topics;
pub mod user;
pub mod video;

pub use batch::{BatchCompleted, JoinOutcome, LateEvent, MediaCompleted, Report, ReportGroup};
pub use dead_letter::{DeadLetter, MessageSource, RawMessage};
pub use envelope::{EventData, EventError, data_json, decode, encode};
pub use item::{ItemProcessed, WorkItem, item_id};
pub use media::{
    BatchItem, Detection, ImageProcessed, ImageRedacted, MediaKind, MediaProcessed, MediaUploaded,
    ObjectRef, Output, RenditionRef, StepResult,
};
pub use topics::{TopicSpec, Topics};
pub use user::{
    Channel, CodeRequested, NotificationPrefs, NotificationRegistered, SmsRequested, UserProfile,
    UserSignedUp, UserVerified,
};
pub use video::{PreviewRef, StoryboardRef, VideoFrame, VideoProcessed};
