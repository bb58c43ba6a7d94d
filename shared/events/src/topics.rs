//! The topics mediaflow declares, with their partition counts and retention.
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

    /// Work queue of image uploads, fed by the router.
    pub fn jobs_image(&self) -> String {
        self.name("jobs.image")
    }

    /// Work queue of video uploads, fed by the router.
    pub fn jobs_video(&self) -> String {
        self.name("jobs.video")
    }

    /// Result topic: thumbnails made (`mediaflow.media.thumbnailed`).
    pub fn media_thumbnailed(&self) -> String {
        self.name("media.thumbnailed")
    }

    /// Result topic of generic stages such as exec workers (`mediaflow.media.processed`).
    pub fn media_processed(&self) -> String {
        self.name("media.processed")
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
            spec(self.jobs_image(), 7 * DAY),
            spec(self.jobs_video(), 7 * DAY),
            spec(self.media_processed(), 30 * DAY),
            spec(self.dead_letters(), 30 * DAY),
            spec(self.media_thumbnailed(), 30 * DAY),
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
        assert_eq!(declared.len(), 6);
        assert!(
            declared
                .iter()
                .all(|t| t.name.starts_with("t1.") && t.partitions == 3)
        );
        assert_eq!(topics.jobs_image(), "t1.jobs.image");
    }
}
