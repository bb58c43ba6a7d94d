//! Wrapping payloads in CloudEvents 1.0 envelopes and unwrapping them again.
//!
//! The envelope carries the event type, a deterministic id, the producing stage as `source` and the
//! entity the event is about as `subject` (also the Kafka partition key).

use cloudevents::{AttributesReader, Data, Event, EventBuilder, EventBuilderV10};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A payload that travels inside a CloudEvent.
pub trait EventData: Serialize + DeserializeOwned {
    /// The CloudEvents `type` attribute; also the name of the payload's schema in `schemas/`.
    const TYPE: &'static str;

    /// The entity this event is about: the CloudEvents `subject` and the partition key.
    fn subject(&self) -> String;

    /// A deterministic event id: the same logical event always gets the same id, so consumers can
    /// recognise a redelivered duplicate.
    fn id(&self) -> String;
}

/// Why an envelope could not be built or read.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("expected an event of type `{expected}`, got `{actual}`")]
    WrongType {
        expected: &'static str,
        actual: String,
    },
    #[error("event `{id}` has no data")]
    NoData { id: String },
    #[error("event `{id}` of type `{ty}` has data that does not match its schema: {source}")]
    BadData {
        id: String,
        ty: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("could not build a CloudEvent: {0}")]
    Build(#[from] cloudevents::event::EventBuilderError),
    #[error("could not serialize event data: {0}")]
    Serialize(#[source] serde_json::Error),
}

/// Wraps `data` in a CloudEvents 1.0 envelope produced by `source` (a stage URI such as
/// `/mediaflow/image-worker`).
pub fn encode<T: EventData>(data: &T, source: &str) -> Result<Event, EventError> {
    let json = serde_json::to_value(data).map_err(EventError::Serialize)?;
    let event = EventBuilderV10::new()
        .id(data.id())
        .ty(T::TYPE)
        .source(source)
        .subject(data.subject())
        .time(chrono::Utc::now())
        .data("application/json", json)
        .build()?;
    Ok(event)
}

/// Reads the payload of an event of type `T`, checking its type first.
pub fn decode<T: EventData>(event: &Event) -> Result<T, EventError> {
    if event.ty() != T::TYPE {
        return Err(EventError::WrongType {
            expected: T::TYPE,
            actual: event.ty().to_owned(),
        });
    }
    serde_json::from_value(data_json(event)?).map_err(|source| EventError::BadData {
        id: event.id().to_owned(),
        ty: event.ty().to_owned(),
        source,
    })
}

/// The event's data as JSON, however the binding delivered it (the Kafka binding hands JSON
/// payloads over as bytes).
pub fn data_json(event: &Event) -> Result<serde_json::Value, EventError> {
    let bad = |source| EventError::BadData {
        id: event.id().to_owned(),
        ty: event.ty().to_owned(),
        source,
    };
    match event.data() {
        Some(Data::Json(v)) => Ok(v.clone()),
        Some(Data::Binary(b)) => serde_json::from_slice(b).map_err(bad),
        Some(Data::String(s)) => serde_json::from_str(s).map_err(bad),
        None => Err(EventError::NoData {
            id: event.id().to_owned(),
        }),
    }
}
