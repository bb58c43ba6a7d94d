//! Payloads of coordinated batch processing (ch. 12): a media whose branches all arrived, a
//! batch whose items all arrived (the joins' barriers released), and a reducer's report.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::EventData;
use crate::media::{BatchItem, deterministic_id};

/// How a join released: everything succeeded, everything arrived with some failures
/// (`complete-partial`), or a failure ended it (`fail-batch`, or a deadline under it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinOutcome {
    Complete,
    Partial,
    Failed,
}

impl JoinOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            JoinOutcome::Complete => "complete",
            JoinOutcome::Partial => "partial",
            JoinOutcome::Failed => "failed",
        }
    }
}

/// `mediaflow.media.completed`: every branch a pipeline declares for a media arrived (a media
/// join released). Carries each branch's result, so the stages after the join read one event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MediaCompleted {
    pub media_id: String,
    /// The join stage that released it.
    pub stage: String,
    /// The media's place in a batch, if it was uploaded into one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchItem>,
    pub outcome: JoinOutcome,
    /// Branch name -> the data of the event that branch produced.
    pub branches: BTreeMap<String, Value>,
    /// Branch name -> why it failed (its dead letter's error, or that it timed out).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failures: BTreeMap<String, String>,
    /// RFC 3339.
    pub completed_at: String,
}

impl EventData for MediaCompleted {
    const TYPE: &'static str = "mediaflow.media.completed";

    fn subject(&self) -> String {
        self.media_id.clone()
    }

    fn id(&self) -> String {
        deterministic_id(&[Self::TYPE, &self.stage, &self.media_id])
    }
}

/// `mediaflow.batch.completed`: every item of a batch arrived, or its failure policy or
/// deadline ended it (a batch join released).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchCompleted {
    pub batch_id: String,
    /// The join stage that released it.
    pub stage: String,
    pub outcome: JoinOutcome,
    /// Item name -> media id, for the items that completed.
    pub items: BTreeMap<String, String>,
    /// Item name -> why it failed or that it never arrived.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failures: BTreeMap<String, String>,
    /// RFC 3339.
    pub completed_at: String,
}

impl EventData for BatchCompleted {
    const TYPE: &'static str = "mediaflow.batch.completed";

    fn subject(&self) -> String {
        self.batch_id.clone()
    }

    fn id(&self) -> String {
        deterministic_id(&[Self::TYPE, &self.stage, &self.batch_id])
    }
}

/// What a report aggregates over: one batch, or one tumbling event-time window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum ReportGroup {
    Batch {
        batch_id: String,
    },
    Window {
        /// Milliseconds since the epoch; the window is `[start_ms, end_ms)`.
        start_ms: i64,
        end_ms: i64,
    },
}

impl ReportGroup {
    /// The group as one string: `batch:<id>` or `window:<start>-<end>`.
    pub fn key(&self) -> String {
        match self {
            ReportGroup::Batch { batch_id } => format!("batch:{batch_id}"),
            ReportGroup::Window { start_ms, end_ms } => format!("window:{start_ms}-{end_ms}"),
        }
    }
}

/// `mediaflow.report`: a reducer's aggregates over one group, emitted once when the group
/// closes (its batch completed, its window's watermark passed). `partials` are the mergeable
/// forms of `aggregates`: a reducer further up (leaf -> root) merges them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The reduce stage.
    pub stage: String,
    pub group: ReportGroup,
    /// For a batch: how its join released (a failed batch is reported without aggregates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<JoinOutcome>,
    /// How many inputs the aggregates cover.
    pub inputs: u64,
    /// Aggregate name -> its value (counts by key, a sum, a histogram).
    pub aggregates: BTreeMap<String, Value>,
    /// Aggregate name -> its mergeable partial.
    pub partials: BTreeMap<String, Value>,
    /// For a batch: item name -> why it is not in the aggregates.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failures: BTreeMap<String, String>,
    /// RFC 3339.
    pub reported_at: String,
}

impl EventData for Report {
    const TYPE: &'static str = "mediaflow.report";

    fn subject(&self) -> String {
        match &self.group {
            ReportGroup::Batch { batch_id } => batch_id.clone(),
            ReportGroup::Window { .. } => self.group.key(),
        }
    }

    fn id(&self) -> String {
        deterministic_id(&[Self::TYPE, &self.stage, &self.group.key()])
    }
}

/// `mediaflow.late`: an event that arrived after its window closed (its time is behind the
/// reducer's watermark by more than the allowed lateness). Kept, visible, and not in any report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LateEvent {
    /// The reduce stage.
    pub stage: String,
    /// The late event's id, type and time.
    pub event_id: String,
    pub event_type: String,
    pub event_time: String,
    /// The window it belonged to, `[start_ms, end_ms)`.
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    /// The reducer's watermark when it arrived (ms since the epoch).
    pub watermark_ms: i64,
    /// The late event's data.
    pub data: Value,
}

impl EventData for LateEvent {
    const TYPE: &'static str = "mediaflow.late";

    fn subject(&self) -> String {
        self.event_id.clone()
    }

    fn id(&self) -> String {
        deterministic_id(&[Self::TYPE, &self.stage, &self.event_id])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;

    use super::*;
    use crate::schema::validate;

    fn sample<T: EventData>(data: &T) -> Value {
        serde_json::to_value(data).unwrap()
    }

    #[test]
    fn payloads_match_their_schemas_and_ids_are_deterministic() {
        let media = MediaCompleted {
            media_id: "m1".into(),
            stage: "media-join".into(),
            batch: Some(BatchItem {
                batch_id: "b1".into(),
                item: "a.jpg".into(),
            }),
            outcome: JoinOutcome::Partial,
            branches: BTreeMap::from([("tags".to_owned(), json!({"colours": []}))]),
            failures: BTreeMap::from([("redact".to_owned(), "timed out".to_owned())]),
            completed_at: "2026-12-03T10:00:00Z".into(),
        };
        validate(MediaCompleted::TYPE, &sample(&media)).unwrap();
        let mut again = media.clone();
        again.completed_at = "2026-12-03T11:00:00Z".into();
        assert_eq!(
            media.id(),
            again.id(),
            "the id is the join's, not the time's"
        );

        let batch = BatchCompleted {
            batch_id: "b1".into(),
            stage: "batch-join".into(),
            outcome: JoinOutcome::Complete,
            items: BTreeMap::from([("a.jpg".to_owned(), "m1".to_owned())]),
            failures: BTreeMap::new(),
            completed_at: "2026-12-03T10:00:00Z".into(),
        };
        validate(BatchCompleted::TYPE, &sample(&batch)).unwrap();

        for group in [
            ReportGroup::Batch {
                batch_id: "b1".into(),
            },
            ReportGroup::Window {
                start_ms: 0,
                end_ms: 60_000,
            },
        ] {
            let report = Report {
                stage: "report".into(),
                group,
                outcome: None,
                inputs: 3,
                aggregates: BTreeMap::from([("objects".to_owned(), json!({"face": 2}))]),
                partials: BTreeMap::from([(
                    "objects".to_owned(),
                    json!({"op": "count", "counts": {"face": 2}}),
                )]),
                failures: BTreeMap::new(),
                reported_at: "2026-12-03T10:00:00Z".into(),
            };
            validate(Report::TYPE, &sample(&report)).unwrap();
        }

        let late = LateEvent {
            stage: "report".into(),
            event_id: "e1".into(),
            event_type: "mediaflow.media.completed".into(),
            event_time: "2026-12-03T10:00:00Z".into(),
            window_start_ms: 0,
            window_end_ms: 60_000,
            watermark_ms: 200_000,
            data: json!({"x": 1}),
        };
        validate(LateEvent::TYPE, &sample(&late)).unwrap();
        let image = crate::media::tests::image_processed();
        let redacted = crate::ImageRedacted {
            media_id: image.media_id.clone(),
            stage: "redact".into(),
            stage_version: "1".into(),
            output: image.renditions[0].object.clone(),
            input: image.input,
            width: 640,
            height: 480,
            pixels: 640 * 480,
            objects: BTreeMap::from([("face".to_owned(), 1), ("plate".to_owned(), 0)]),
            detections: vec![crate::Detection {
                label: "face".into(),
                x: 10,
                y: 20,
                width: 30,
                height: 30,
            }],
        };
        validate(crate::ImageRedacted::TYPE, &sample(&redacted)).unwrap();
        let mut v = sample(&late);
        v.as_object_mut().unwrap().remove("watermark_ms");
        assert!(validate(LateEvent::TYPE, &v).is_err());
    }
}
