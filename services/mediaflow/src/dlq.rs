//! `mediaflow dlq`: listing the dead-letter topic and replaying dead letters onto the topic they
//! came from, filtered by stage and error class. Each dead letter is replayed once (replays are
//! recorded in the database).

use anyhow::{Context, Result};
use cloudevents::Event;
use mediaflow_bus::Bus;
use mediaflow_db::Db;
use mediaflow_events::{DeadLetter, EventData};

/// Which dead letters a command applies to.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub stage: Option<String>,
    pub class: Option<String>,
}

impl Filter {
    fn matches(&self, letter: &DeadLetter) -> bool {
        self.stage.as_ref().is_none_or(|s| *s == letter.stage)
            && self.class.as_ref().is_none_or(|c| *c == letter.error_class)
    }
}

/// A dead letter as listed.
#[derive(Clone, Debug)]
pub struct Entry {
    pub id: String,
    pub letter: DeadLetter,
    pub replayed: bool,
}

/// The dead letters on the topic now that match `filter`, oldest first per partition.
pub async fn list(bus: &Bus, db: &Db, filter: &Filter) -> Result<Vec<Entry>> {
    let replayed = db.replayed_dead_letters().await?;
    let mut entries = Vec::new();
    for delivery in bus.read_to_end(&bus.topics().dead_letters()).await? {
        // Anything on the topic that is not a dead letter is not ours to list.
        let Ok(event) = delivery.event else { continue };
        let Ok(letter) = mediaflow_events::decode::<DeadLetter>(&event) else {
            continue;
        };
        if filter.matches(&letter) {
            let id = letter.id();
            entries.push(Entry {
                replayed: replayed.contains(&id),
                id,
                letter,
            });
        }
    }
    Ok(entries)
}

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Published again on their source topic.
    pub replayed: usize,
    /// Replayed before; left alone.
    pub already: usize,
    /// Not CloudEvents (malformed messages): nothing to replay.
    pub unreplayable: usize,
}

/// Publishes every matching dead letter's original event again on the topic it was read from.
pub async fn replay(bus: &Bus, db: &Db, filter: &Filter) -> Result<Replayed> {
    let publisher = bus.publisher("/mediaflow/dlq-replay")?;
    let mut report = Replayed::default();
    for entry in list(bus, db, filter).await? {
        if entry.replayed {
            report.already += 1;
            continue;
        }
        let Some(original) = &entry.letter.event else {
            report.unreplayable += 1;
            continue;
        };
        let event: Event = serde_json::from_value(original.clone())
            .with_context(|| format!("dead letter {} holds an invalid event", entry.id))?;
        let source = &entry.letter.source;
        let key = source
            .key
            .clone()
            .unwrap_or_else(|| entry.letter.stage.clone());
        publisher.publish_event(&source.topic, &key, event).await?;
        db.record_replay(&entry.id, &entry.letter.stage).await?;
        report.replayed += 1;
    }
    Ok(report)
}

/// Prints `entries` as a table.
pub fn print(entries: &[Entry], out: &mut dyn std::io::Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<36}  {:<13}  {:<9}  {:>8}  {:<24}  {:<8}  error",
        "id", "stage", "class", "attempts", "failed at", "replayed"
    )?;
    for e in entries {
        let l = &e.letter;
        let error: String = l.error.chars().take(120).collect();
        writeln!(
            out,
            "{:<36}  {:<13}  {:<9}  {:>8}  {:<24}  {:<8}  {error}",
            e.id,
            l.stage,
            l.error_class,
            l.attempts,
            l.failed_at,
            if e.replayed { "yes" } else { "no" }
        )?;
    }
    Ok(())
}
