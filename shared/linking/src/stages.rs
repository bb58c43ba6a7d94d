//! The linking stages at run time: handlers that pass events on (same id, subject, data and
//! key; the stage becomes their source), choosing the ports they go out on. Predicates and keys are CEL over the
//! event (`mediaflow_pipeline::expr`); an event an expression cannot be evaluated on (a field it
//! lacks, a value of the wrong type) is bad input, dead-lettered with the reason, never dropped
//! silently.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cloudevents::{AttributesReader, Event};
use mediaflow_pipeline::expr::{EventView, Expr};
use mediaflow_pipeline::kinds::{FilterConfig, SharderConfig, SplitterConfig};
use mediaflow_runtime::{Handler, Output, StageError};
use mediaflow_telemetry::Metrics;

use crate::ring::Ring;

/// Events a linking stage has in flight when its declaration does not say. Passing an event on
/// costs next to nothing but a broker round trip, so the window is wide: with the stage default
/// of 4 a copier would wait on the broker most of the time (`BENCHMARKS.md`, copier).
pub const CONCURRENCY: usize = 512;

/// Runs `f` on what an expression sees of an event. Data that is not JSON is seen as `null`.
fn with_view<T>(event: &Event, f: impl FnOnce(&EventView<'_>) -> T) -> T {
    let data = mediaflow_events::data_json(event).unwrap_or(serde_json::Value::Null);
    let source = event.source().to_string();
    f(&EventView {
        id: event.id(),
        ty: event.ty(),
        source: &source,
        subject: event.subject(),
        data: &data,
    })
}

fn compile(what: &str, source: &str) -> Result<Expr, String> {
    Expr::compile(source).map_err(|e| format!("{what}: {e}"))
}

fn bad(event: &Event, why: String) -> StageError {
    StageError::bad_input(format!("event {}: {why}", event.id()))
}

/// copier: every event to every output port.
#[derive(Debug)]
pub struct Copier {
    ports: Vec<String>,
}

impl Copier {
    pub fn new(ports: impl IntoIterator<Item = String>) -> Self {
        Self {
            ports: ports.into_iter().collect(),
        }
    }
}

impl Handler for Copier {
    async fn handle(&self, event: &Event) -> Result<Vec<Output>, StageError> {
        Ok(self
            .ports
            .iter()
            .map(|p| Output::forward(p, event))
            .collect())
    }
}

/// filter: the events its predicate holds for, on port `out`.
#[derive(Debug)]
pub struct Filter {
    stage: String,
    predicate: Expr,
    metrics: Metrics,
}

impl Filter {
    pub fn new(stage: &str, config: &FilterConfig, metrics: Metrics) -> Result<Self, String> {
        Ok(Self {
            stage: stage.to_owned(),
            predicate: compile("predicate", &config.predicate)?,
            metrics,
        })
    }
}

impl Handler for Filter {
    async fn handle(&self, event: &Event) -> Result<Vec<Output>, StageError> {
        if with_view(event, |v| self.predicate.holds(v)).map_err(|e| bad(event, e))? {
            Ok(vec![Output::forward("out", event)])
        } else {
            self.metrics.stage_dropped(&self.stage);
            Ok(Vec::new())
        }
    }
}

/// splitter: each event to every port whose predicate holds (a copy each), else to the default
/// port; without one such an event is dropped and counted.
#[derive(Debug)]
pub struct Splitter {
    stage: String,
    routes: Vec<(String, Expr)>,
    default: Option<String>,
    metrics: Metrics,
}

impl Splitter {
    pub fn new(stage: &str, config: &SplitterConfig, metrics: Metrics) -> Result<Self, String> {
        let routes = config
            .routes
            .iter()
            .map(|(port, p)| Ok((port.clone(), compile(&format!("route `{port}`"), p)?)))
            .collect::<Result<_, String>>()?;
        Ok(Self {
            stage: stage.to_owned(),
            routes,
            default: config.default.clone(),
            metrics,
        })
    }
}

impl Handler for Splitter {
    async fn handle(&self, event: &Event) -> Result<Vec<Output>, StageError> {
        let mut outputs = Vec::new();
        with_view(event, |v| {
            for (port, predicate) in &self.routes {
                if predicate.holds(v)? {
                    outputs.push(Output::forward(port, event));
                }
            }
            Ok(())
        })
        .map_err(|e| bad(event, e))?;
        if outputs.is_empty() {
            match &self.default {
                Some(port) => outputs.push(Output::forward(port, event)),
                None => self.metrics.stage_dropped(&self.stage),
            }
        }
        Ok(outputs)
    }
}

/// Which of a sharder's shards are healthy now; written by whoever watches the shards' readers,
/// read by the sharder for every event. Every shard starts healthy.
#[derive(Debug)]
pub struct ShardHealth {
    healthy: Vec<AtomicBool>,
}

impl ShardHealth {
    pub fn new(shards: u32) -> Arc<Self> {
        Arc::new(Self {
            healthy: (0..shards.max(1)).map(|_| AtomicBool::new(true)).collect(),
        })
    }

    pub fn set(&self, shard: u32, healthy: bool) {
        if let Some(h) = self.healthy.get(shard as usize) {
            h.store(healthy, Ordering::Relaxed);
        }
    }

    pub fn is_healthy(&self, shard: u32) -> bool {
        self.healthy
            .get(shard as usize)
            .is_some_and(|h| h.load(Ordering::Relaxed))
    }
}

/// sharder: each event to port `shard-<n>`, `n` chosen by consistent hashing of its key among
/// the healthy shards (its home shard while that is healthy). With no shard healthy, every
/// event goes home and waits there: nothing is dropped.
#[derive(Debug)]
pub struct Sharder {
    key: Expr,
    ring: Ring,
    health: Arc<ShardHealth>,
}

impl Sharder {
    pub fn new(config: &SharderConfig, health: Arc<ShardHealth>) -> Result<Self, String> {
        Ok(Self {
            key: compile("key", &config.key)?,
            ring: Ring::new(config.shards),
            health,
        })
    }

    /// The port of the shard `key` goes to now.
    pub fn port_for(&self, key: &str) -> String {
        let key = key.as_bytes();
        let shard = self
            .ring
            .shard_among(key, |s| self.health.is_healthy(s))
            .unwrap_or_else(|| self.ring.shard(key));
        format!("shard-{shard}")
    }
}

impl Handler for Sharder {
    async fn handle(&self, event: &Event) -> Result<Vec<Output>, StageError> {
        let key = with_view(event, |v| self.key.key(v)).map_err(|e| bad(event, e))?;
        Ok(vec![Output::forward(&self.port_for(&key), event)])
    }
}

/// merger: every input onto port `out`. Events of one key are handled one after another, and
/// each is published before the next starts, so each input's per-key order is kept.
#[derive(Debug, Default)]
pub struct Merger;

impl Handler for Merger {
    async fn handle(&self, event: &Event) -> Result<Vec<Output>, StageError> {
        Ok(vec![Output::forward("out", event)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudevents::{EventBuilder, EventBuilderV10};

    fn event(data: serde_json::Value) -> Event {
        EventBuilderV10::new()
            .id("e1")
            .ty("t")
            .source("/s")
            .subject("k")
            .data("application/json", data)
            .build()
            .unwrap()
    }

    fn ports(outputs: &[Output]) -> Vec<&str> {
        outputs.iter().map(Output::port).collect()
    }

    #[tokio::test]
    async fn splitter_copies_to_every_match_else_the_default() {
        let config: SplitterConfig = serde_json::from_value(serde_json::json!({
            "routes": {"big": "data.size > 10", "even": "data.size % 2 == 0"},
            "default": "rest"
        }))
        .unwrap();
        let s = Splitter::new("s", &config, Metrics::new()).unwrap();
        let route = |size: i64| {
            let s = &s;
            async move { s.handle(&event(serde_json::json!({ "size": size }))).await }
        };
        assert_eq!(ports(&route(12).await.unwrap()), ["big", "even"]);
        assert_eq!(ports(&route(11).await.unwrap()), ["big"]);
        assert_eq!(ports(&route(3).await.unwrap()), ["rest"]);
        let err = s.handle(&event(serde_json::json!({}))).await.unwrap_err();
        assert_eq!(err.class, mediaflow_runtime::ErrorClass::BadInput);
    }

    #[test]
    fn the_sharder_routes_around_an_unhealthy_shard_and_back() {
        let config: SharderConfig =
            serde_json::from_value(serde_json::json!({"key": "subject", "shards": 4})).unwrap();
        let health = ShardHealth::new(4);
        let s = Sharder::new(&config, health.clone()).unwrap();
        let keys: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
        let home: Vec<String> = keys.iter().map(|k| s.port_for(k)).collect();
        health.set(1, false);
        for (k, h) in keys.iter().zip(&home) {
            let now = s.port_for(k);
            assert_ne!(now, "shard-1");
            if h != "shard-1" {
                assert_eq!(&now, h);
            }
        }
        for shard in [0, 2, 3] {
            health.set(shard, false);
        }
        assert!(keys.iter().zip(&home).all(|(k, h)| &s.port_for(k) == h));
        for shard in 0..4 {
            health.set(shard, true);
        }
        assert!(keys.iter().zip(&home).all(|(k, h)| &s.port_for(k) == h));
    }
}
