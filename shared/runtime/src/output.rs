//! What a stage produces: events on named output ports (`out`, `shard-3`, `email`, ...). A
//! handler returns them; the runtime binds each port to the topic the pipeline declares for it,
//! publishes, and waits for every acknowledgement before the input's offset may move.
//!
//! Output ids are deterministic, so a redelivered input produces the same events again and
//! consumers recognise the duplicates: an event built from a payload keeps the payload's own id
//! (`EventData::id`), a forwarded event keeps its id, and any other event gets an id derived
//! from the input's id, the stage, its version, the port and the output's position. The stage is
//! the `source` of every event it publishes, forwarded ones included: (source, id) stays unique,
//! as CloudEvents asks, and a reader can tell which stage a copy came through.

use std::collections::BTreeMap;

use cloudevents::event::AttributesWriter;
use cloudevents::{AttributesReader, Event, EventBuilder, EventBuilderV10};
use mediaflow_events::EventData;

use crate::StageError;

/// One event a stage produces, on one of its ports.
#[derive(Clone, Debug)]
pub struct Output {
    port: String,
    key: String,
    event: Event,
    origin: Origin,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// Built from a payload with its own deterministic id; the stage is its source.
    Payload,
    /// Passed on (a linking stage): its id, subject, time and data stay.
    Forwarded,
    /// Built by the stage without an id of its own: one is derived from the input.
    Derived,
}

impl Output {
    /// A payload as a new event on `port`, keyed by its subject.
    pub fn data<T: EventData>(port: &str, data: &T) -> Result<Self, StageError> {
        let event = mediaflow_events::encode(data, "/mediaflow")
            .map_err(|e| StageError::permanent(format!("encoding an output: {e}")))?;
        Ok(Self {
            port: port.to_owned(),
            key: data.subject(),
            event,
            origin: Origin::Payload,
        })
    }

    /// `event` passed on on `port` with its id, subject, time and data, keyed as it was keyed
    /// when it came in (its subject, else its id).
    pub fn forward(port: &str, event: &Event) -> Self {
        let key = event
            .subject()
            .map_or_else(|| event.id().to_owned(), str::to_owned);
        Self {
            port: port.to_owned(),
            key,
            event: event.clone(),
            origin: Origin::Forwarded,
        }
    }

    /// A JSON event of type `ty` about `subject` (also its key) on `port`; its id is derived
    /// from the input's.
    pub fn json(
        port: &str,
        ty: &str,
        subject: &str,
        data: serde_json::Value,
    ) -> Result<Self, StageError> {
        let event = EventBuilderV10::new()
            .id("derived")
            .ty(ty)
            .source("/mediaflow")
            .subject(subject)
            .time(chrono::Utc::now())
            .data("application/json", data)
            .build()
            .map_err(|e| StageError::permanent(format!("building an output: {e}")))?;
        Ok(Self {
            port: port.to_owned(),
            key: subject.to_owned(),
            event,
            origin: Origin::Derived,
        })
    }

    /// The same output on another port.
    pub fn on(mut self, port: &str) -> Self {
        port.clone_into(&mut self.port);
        self
    }

    pub fn port(&self) -> &str {
        &self.port
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn event(&self) -> &Event {
        &self.event
    }
}

/// An output bound to its topic, ready to publish.
#[derive(Clone, Debug)]
pub struct Bound {
    pub port: String,
    pub topic: String,
    pub key: String,
    pub event: Event,
}

/// A stage's output ports, bound to the topics its declaration names.
#[derive(Clone, Debug)]
pub struct Ports {
    stage: String,
    version: u32,
    source: String,
    topics: BTreeMap<String, String>,
}

impl Ports {
    /// Stage `stage` at `version`, with port -> topic bindings; events it makes have the source
    /// `/mediaflow/<stage>`.
    pub fn new(stage: &str, version: u32, topics: BTreeMap<String, String>) -> Self {
        Self {
            stage: stage.to_owned(),
            version,
            source: format!("/mediaflow/{stage}"),
            topics,
        }
    }

    /// The topic `port` is bound to.
    pub fn topic(&self, port: &str) -> Option<&str> {
        self.topics.get(port).map(String::as_str)
    }

    pub fn bindings(&self) -> &BTreeMap<String, String> {
        &self.topics
    }

    /// Binds the outputs `input` produced to their topics, stamping the stage as the source of
    /// the events it made and giving derived ones their ids. A port bound to nothing is a
    /// permanent failure (the declaration and the stage disagree).
    pub fn bind(&self, input: &Event, outputs: Vec<Output>) -> Result<Vec<Bound>, StageError> {
        outputs
            .into_iter()
            .enumerate()
            .map(|(position, o)| {
                let topic = self.topic(&o.port).ok_or_else(|| {
                    StageError::permanent(format!(
                        "stage `{}` produced an event on port `{}`, which is bound to no topic (bound: {})",
                        self.stage,
                        o.port,
                        self.topics.keys().cloned().collect::<Vec<_>>().join(", ")
                    ))
                })?;
                let mut event = o.event;
                event.set_source(self.source.as_str());
                if o.origin == Origin::Derived {
                    event.set_id(self.derived_id(input.id(), &o.port, position));
                }
                Ok(Bound {
                    port: o.port,
                    topic: topic.to_owned(),
                    key: o.key,
                    event,
                })
            })
            .collect()
    }

    /// The id of the output at `position` on `port` made from input `input_id`: the same every
    /// time the input is handled again.
    pub fn derived_id(&self, input_id: &str, port: &str, position: usize) -> String {
        let name = format!(
            "{input_id}/{}/v{}/{port}/{position}",
            self.stage, self.version
        );
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, name.as_bytes()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(id: &str) -> Event {
        EventBuilderV10::new()
            .id(id)
            .ty("t")
            .source("/in")
            .subject("k1")
            .build()
            .unwrap()
    }

    fn ports() -> Ports {
        Ports::new(
            "s",
            2,
            BTreeMap::from([("out".into(), "t.out".into()), ("b".into(), "t.b".into())]),
        )
    }

    #[test]
    fn derived_ids_depend_on_input_port_position_and_version_only() {
        let p = ports();
        let outs = || {
            vec![
                Output::json("out", "x", "k", serde_json::json!(1)).unwrap(),
                Output::json("out", "x", "k", serde_json::json!(2)).unwrap(),
                Output::json("b", "x", "k", serde_json::json!(3)).unwrap(),
            ]
        };
        let ids = |o: Vec<Bound>| o.into_iter().map(|b| b.event.id().to_owned()).collect();
        let first: Vec<String> = ids(p.bind(&input("i1"), outs()).unwrap());
        let again: Vec<String> = ids(p.bind(&input("i1"), outs()).unwrap());
        assert_eq!(first, again, "a redelivered input gets the same ids");
        let unique: std::collections::HashSet<_> = first.iter().collect();
        assert_eq!(unique.len(), 3);
        let other: Vec<String> = ids(p.bind(&input("i2"), outs()).unwrap());
        assert!(first.iter().all(|id| !other.contains(id)));
        let v3 = Ports::new("s", 3, p.bindings().clone());
        let newer: Vec<String> = ids(v3.bind(&input("i1"), outs()).unwrap());
        assert!(first.iter().all(|id| !newer.contains(id)));
    }

    #[test]
    fn forwarded_events_keep_their_id_and_ports_map_to_topics() {
        let p = ports();
        let bound = p
            .bind(&input("i1"), vec![Output::forward("b", &input("i1"))])
            .unwrap();
        assert_eq!(bound[0].topic, "t.b");
        assert_eq!(bound[0].key, "k1");
        assert_eq!(bound[0].event.id(), "i1");
        assert_eq!(bound[0].event.subject(), Some("k1"));
        assert_eq!(bound[0].event.source().to_string(), "/mediaflow/s");
        let made = p
            .bind(
                &input("i1"),
                vec![Output::json("out", "x", "k", serde_json::json!(1)).unwrap()],
            )
            .unwrap();
        assert_eq!(made[0].event.source().to_string(), "/mediaflow/s");
    }

    #[test]
    fn a_port_bound_to_nothing_is_a_permanent_failure() {
        let err = ports()
            .bind(&input("i1"), vec![Output::forward("nope", &input("i1"))])
            .unwrap_err();
        assert_eq!(err.class, crate::ErrorClass::Permanent);
        assert!(err.message.contains("port `nope`"), "{}", err.message);
    }
}
