//! `mediaflow.dead-letter`: a message a stage gave up on, with why, and everything needed to
//! replay it.

use serde::{Deserialize, Serialize};

use crate::EventData;
use crate::media::deterministic_id;

/// Where a message was read from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageSource {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// A message that was not a CloudEvent, kept as it arrived (the value as text, lossily decoded,
/// and cut at 64 KiB).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawMessage {
    pub value: String,
    pub value_len: u64,
    pub headers: Vec<(String, String)>,
}

/// The payload of a dead letter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The stage that gave up.
    pub stage: String,
    /// `transient` (attempts exhausted), `permanent` or `bad_input`.
    pub error_class: String,
    pub error: String,
    /// How many times the stage tried.
    pub attempts: u32,
    /// RFC 3339 time the stage gave up.
    pub failed_at: String,
    pub source: MessageSource,
    /// The original CloudEvent in structured JSON form, when the message was one: what a replay
    /// publishes again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<serde_json::Value>,
    /// The message as received, when it was not a CloudEvent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<RawMessage>,
}

impl EventData for DeadLetter {
    const TYPE: &'static str = "mediaflow.dead-letter";

    fn subject(&self) -> String {
        self.stage.clone()
    }

    /// One dead letter per stage and input message position: giving up on the same message
    /// again after a crash yields the same id.
    fn id(&self) -> String {
        let s = &self.source;
        deterministic_id(&[
            Self::TYPE,
            &self.stage,
            &s.topic,
            &s.partition.to_string(),
            &s.offset.to_string(),
        ])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn dead_letter() -> DeadLetter {
        DeadLetter {
            stage: "image-worker".into(),
            error_class: "bad_input".into(),
            error: "corrupt JPEG".into(),
            attempts: 1,
            failed_at: "2026-11-24T00:00:00Z".into(),
            source: MessageSource {
                topic: "jobs.image".into(),
                partition: 2,
                offset: 41,
                key: Some("m1".into()),
            },
            event: Some(
                serde_json::json!({"specversion": "1.0", "id": "x", "type": "t", "source": "/s"}),
            ),
            raw: None,
        }
    }

    #[test]
    fn ids_follow_the_message_position() {
        let a = dead_letter();
        let mut b = dead_letter();
        b.error = "other".into();
        assert_eq!(a.id(), b.id());
        b.source.offset += 1;
        assert_ne!(a.id(), b.id());
    }
}
