//! Payloads of generic work items: what a book-contract HTTP source (ch. 10's `/api/v1/items`)
//! finds, and what a stage made of it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::EventData;
use crate::media::{Output, deterministic_id};

/// The id of item `name` of source `source`: the same item always gets the same id, so it is
/// enqueued once however often the source lists it.
pub fn item_id(source: &str, name: &str) -> String {
    deterministic_id(&["item", source, name])
}

/// `mediaflow.work.item`: a source found an item and queued it for work.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkItem {
    /// `item_id(source, name)`.
    pub item_id: String,
    /// The configured source that found it.
    pub source: String,
    /// The item's name in the source (`/api/v1/items/<name>`).
    pub name: String,
    /// The item's `data` as the source served it; workers get it in `WORK_ITEM_FILE`.
    pub data: Value,
    /// RFC 3339 time the source fetched the item.
    pub found_at: String,
}

impl EventData for WorkItem {
    const TYPE: &'static str = "mediaflow.work.item";

    fn subject(&self) -> String {
        self.item_id.clone()
    }

    fn id(&self) -> String {
        deterministic_id(&[Self::TYPE, &self.item_id])
    }
}

/// `mediaflow.item.processed`: a generic stage (such as an exec worker) produced outputs for a
/// work item (a result event).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemProcessed {
    pub item_id: String,
    pub source: String,
    pub name: String,
    /// Lineage: the stage and its version.
    pub stage: String,
    pub stage_version: String,
    pub outputs: Vec<Output>,
}

impl EventData for ItemProcessed {
    const TYPE: &'static str = "mediaflow.item.processed";

    fn subject(&self) -> String {
        self.item_id.clone()
    }

    fn id(&self) -> String {
        deterministic_id(&[Self::TYPE, &self.item_id, &self.stage, &self.stage_version])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::media::tests::object;
    use crate::{decode, encode};

    pub(crate) fn work_item() -> WorkItem {
        WorkItem {
            item_id: item_id("books", "item-1"),
            source: "books".into(),
            name: "item-1".into(),
            data: serde_json::json!({"file": "movie-1.mp4", "n": 1}),
            found_at: "2026-11-24T12:00:00Z".into(),
        }
    }

    pub(crate) fn item_processed() -> ItemProcessed {
        ItemProcessed {
            item_id: item_id("books", "item-1"),
            source: "books".into(),
            name: "item-1".into(),
            stage: "count".into(),
            stage_version: "1".into(),
            outputs: vec![Output {
                name: "count.txt".into(),
                object: object("derived/items/x/count/v1/count.txt"),
            }],
        }
    }

    #[test]
    fn item_ids_depend_on_source_and_name_only() {
        assert_eq!(item_id("a", "x"), item_id("a", "x"));
        assert_ne!(item_id("a", "x"), item_id("b", "x"));
        assert_ne!(item_id("a", "x"), item_id("a", "y"));
        // The separator keeps ("a/b", "c") and ("a", "b/c") apart.
        assert_ne!(item_id("a/b", "c"), item_id("a", "b/c"));
    }

    #[test]
    fn work_items_round_trip() {
        let event = encode(&work_item(), "/mediaflow/source/books").unwrap();
        assert_eq!(decode::<WorkItem>(&event).unwrap(), work_item());
        assert_ne!(work_item().id(), item_processed().id());
    }
}
