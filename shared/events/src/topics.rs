//! The platform's own topics, with their partition counts and retention: where uploads enter,
//! where sources put work items, where exec stages' results go by default, and the dead letters.
//! The topics between stages are declared in the pipeline file.
//!
//! Topic names are part of the event contract. A deployment can prefix them all (tests give each
//! run its own prefix) but never rename one.

use std::time::Duration;

/// A topic as it is created at start-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub retention: Duration,
}

const DAY: Duration = Duration::from_secs(24 * 3600);

/// The names of every topic, under one optional prefix.
#[derive(Clone, Debug, Default)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// Topic `base` under the prefix.
    pub fn name(&self, base: &str) -> String {
        format!("{}{base}", self.prefix)
    }

    /// Facts: every accepted upload (`mediaflow.media.uploaded`).
    pub fn media_uploaded(&self) -> String {
        self.name("media.uploaded")
    }

    /// Result topic of generic stages such as exec workers (`mediaflow.media.processed`).
    pub fn media_processed(&self) -> String {
        self.name("media.processed")
    }

    /// Work queue of items found by HTTP sources (`mediaflow.work.item`).
    pub fn jobs_items(&self) -> String {
        self.name("jobs.items")
    }

    /// Result topic of generic stages run on work items (`mediaflow.item.processed`).
    pub fn items_processed(&self) -> String {
        self.name("items.processed")
    }

    /// Messages stages gave up on, from every stage (`mediaflow.dead-letter`).
    pub fn dead_letters(&self) -> String {
        self.name("dead-letters")
    }

    /// Every topic the platform needs, with `partitions` partitions each.
    pub fn declared(&self, partitions: i32) -> Vec<TopicSpec> {
        let spec = |name: String, retention| TopicSpec {
            name,
            partitions,
            retention,
        };
        vec![
            spec(self.media_uploaded(), 7 * DAY),
            spec(self.media_processed(), 30 * DAY),
            spec(self.dead_letters(), 30 * DAY),
            spec(self.jobs_items(), 7 * DAY),
            spec(self.items_processed(), 30 * DAY),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_applies_to_every_declared_topic() {
        let topics = Topics::new("t1.");
        let declared = topics.declared(3);
        assert_eq!(declared.len(), 5);
        assert!(
            declared
                .iter()
                .all(|t| t.name.starts_with("t1.") && t.partitions == 3)
        );
        assert_eq!(topics.media_uploaded(), "t1.media.uploaded");
    }
}
