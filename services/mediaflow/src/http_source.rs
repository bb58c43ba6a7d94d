//! The book's work-queue source interface (ch. 10) as a mediaflow source: polls any server that
//! answers `GET /api/v1/items` with `{kind: ItemList, apiVersion: v1, items: [...]}` and
//! `GET /api/v1/items/<name>` with `{kind: Item, apiVersion: v1, data: {...}}`, and enqueues each
//! item it has not enqueued before as a `mediaflow.work.item` event, once.
//!
//! "Once" is kept by the `items` table: an item is enqueued, then recorded; the next poll skips
//! recorded names. A crash between the two enqueues it again with the same event id (and the
//! same item id, so its results land on the same keys and rows). Run one instance per source.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mediaflow_bus::{Bus, Publisher};
use mediaflow_db::Db;
use mediaflow_events::{WorkItem, item_id};
use mediaflow_telemetry::Metrics;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// One HTTP source (`[[http_source]]`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSourceConfig {
    /// Source name: part of every item's id, and `mediaflow run <name>`.
    pub name: String,
    /// Base URL of the server, `http://` or `https://`; `/api/v1/items` is appended (e.g.
    /// `http://queue:8080`).
    pub url: String,
    /// Seconds between polls of the item list.
    #[serde(default = "default_interval")]
    pub interval_secs: u64,
    /// Work queue the items go to, without prefix.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Longest wait for one HTTP answer, in seconds.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Largest answer read (item list or item), in bytes.
    #[serde(default = "default_max_bytes")]
    pub max_response_bytes: usize,
}

fn default_interval() -> u64 {
    10
}
fn default_topic() -> String {
    "jobs.items".into()
}
fn default_timeout() -> u64 {
    10
}
fn default_max_bytes() -> usize {
    4 << 20
}

/// Longest item name accepted (it becomes part of a URL path and of the item's record).
const MAX_NAME_LEN: usize = 512;

/// What one poll did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Poll {
    /// Items enqueued now.
    pub enqueued: usize,
    /// Items listed that were enqueued before.
    pub known: usize,
    /// Items that could not be fetched or were malformed, with why; tried again next poll.
    pub failed: Vec<(String, String)>,
}

/// A running HTTP source.
pub struct HttpSource {
    config: HttpSourceConfig,
    client: reqwest::Client,
    items_url: reqwest::Url,
    db: Db,
    publisher: Publisher,
    topic: String,
    metrics: Metrics,
    /// Names enqueued so far (loaded from the database at start).
    known: HashSet<String>,
}

impl HttpSource {
    pub async fn new(
        config: HttpSourceConfig,
        db: Db,
        bus: &Bus,
        metrics: Metrics,
    ) -> Result<Self> {
        let mut items_url = reqwest::Url::parse(&config.url).with_context(|| {
            format!("http source {}: `{}` is not a URL", config.name, config.url)
        })?;
        if !matches!(items_url.scheme(), "http" | "https") {
            bail!(
                "http source {}: `{}` is not an http:// URL",
                config.name,
                config.url
            );
        }
        items_url
            .path_segments_mut()
            .map_err(|()| {
                anyhow::anyhow!(
                    "http source {}: `{}` cannot take a path",
                    config.name,
                    config.url
                )
            })?
            .pop_if_empty()
            .extend(["api", "v1", "items"]);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_secs.max(1)))
            .build()
            .context("building the HTTP client")?;
        let known = db
            .item_names(&config.name)
            .await
            .with_context(|| format!("loading the items source {} enqueued", config.name))?;
        Ok(Self {
            publisher: bus.publisher(&format!("/mediaflow/source/{}", config.name))?,
            topic: bus.topics().name(&config.topic),
            config,
            client,
            items_url,
            db,
            metrics,
            known,
        })
    }

    /// Polls every `interval_secs` until `shutdown`. A server that is down or answers badly is
    /// logged and asked again at the next poll; only the database or the broker failing ends it.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        let name = self.config.name.clone();
        tracing::info!(source = %name, url = %self.items_url, "http source started");
        let interval = Duration::from_secs(self.config.interval_secs.max(1));
        loop {
            let poll = tokio::select! {
                () = shutdown.cancelled() => break,
                poll = self.poll(&shutdown) => poll?,
            };
            if poll.enqueued > 0 || !poll.failed.is_empty() {
                tracing::info!(source = %name, enqueued = poll.enqueued, known = poll.known, failed = poll.failed.len(), "polled");
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(interval) => {}
            }
        }
        tracing::info!(source = %name, "http source stopped");
        Ok(())
    }

    /// Lists the items once and enqueues the new ones. Errors from the source server are part of
    /// the report; errors from the database or the broker are returned.
    pub async fn poll(&mut self, shutdown: &CancellationToken) -> Result<Poll> {
        let mut report = Poll::default();
        let names = match self.list().await {
            Ok(names) => names,
            Err(why) => {
                tracing::warn!(source = %self.config.name, url = %self.items_url, error = %why, "could not list items");
                self.metrics.source_polled(&self.config.name, "error");
                report.failed.push((String::new(), why));
                return Ok(report);
            }
        };
        for name in names {
            if shutdown.is_cancelled() {
                break;
            }
            if self.known.contains(&name) {
                report.known += 1;
                continue;
            }
            let data = match self.fetch(&name).await {
                Ok(data) => data,
                Err(why) => {
                    tracing::warn!(source = %self.config.name, item = %name, error = %why, "could not fetch item");
                    self.metrics.source_item(&self.config.name, "error");
                    report.failed.push((name, why));
                    continue;
                }
            };
            self.enqueue(&name, data).await?;
            report.enqueued += 1;
        }
        self.metrics.source_polled(&self.config.name, "ok");
        Ok(report)
    }

    async fn enqueue(&mut self, name: &str, data: Value) -> Result<()> {
        let item = WorkItem {
            item_id: item_id(&self.config.name, name),
            source: self.config.name.clone(),
            name: name.to_owned(),
            data,
            found_at: chrono_now(),
        };
        // Enqueued first, recorded second: a crash in between enqueues the item again (same
        // event id) rather than never.
        self.publisher
            .publish(&self.topic, &item)
            .await
            .with_context(|| format!("enqueueing item `{name}` on {}", self.topic))?;
        self.db
            .insert_item(&item.item_id, &self.config.name, name)
            .await
            .with_context(|| format!("recording item `{name}`"))?;
        self.known.insert(name.to_owned());
        self.metrics.source_item(&self.config.name, "enqueued");
        tracing::debug!(source = %self.config.name, item = %name, id = %item.item_id, "enqueued");
        Ok(())
    }

    /// `GET /api/v1/items`: the item names.
    async fn list(&self) -> Result<Vec<String>, String> {
        let body = self.get(self.items_url.clone()).await?;
        parse_item_list(&body)
    }

    /// `GET /api/v1/items/<name>`: the item's data.
    async fn fetch(&self, name: &str) -> Result<Value, String> {
        let mut url = self.items_url.clone();
        url.path_segments_mut()
            .map_err(|()| "the source URL cannot take a path".to_owned())?
            .push(name);
        let body = self.get(url).await?;
        parse_item(&body)
    }

    /// A GET whose body is read up to `max_response_bytes`.
    async fn get(&self, url: reqwest::Url) -> Result<Vec<u8>, String> {
        let mut response = self
            .client
            .get(url.clone())
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", response.status()));
        }
        let limit = self.config.max_response_bytes;
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Err(format!("GET {url}: the answer is over {limit} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?
        {
            if body.len() + chunk.len() > limit {
                return Err(format!("GET {url}: the answer is over {limit} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

fn chrono_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Checks the `kind` and `apiVersion` of a contract document.
fn check_kind(doc: &Value, kind: &str) -> Result<(), String> {
    let got_kind = doc.get("kind").and_then(Value::as_str);
    let got_version = doc.get("apiVersion").and_then(Value::as_str);
    if got_kind != Some(kind) || got_version != Some("v1") {
        return Err(format!(
            "expected {{kind: {kind}, apiVersion: v1}}, got kind {}, apiVersion {}",
            got_kind.map_or("(none)".into(), |k| format!("`{k}`")),
            got_version.map_or("(none)".into(), |v| format!("`{v}`")),
        ));
    }
    Ok(())
}

/// The names in an `ItemList`. Items are names (the book's form), or objects with a `name` or,
/// Kubernetes-style, a `metadata.name`.
pub fn parse_item_list(body: &[u8]) -> Result<Vec<String>, String> {
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| format!("the item list is not JSON: {e}"))?;
    check_kind(&doc, "ItemList")?;
    let items = doc
        .get("items")
        .and_then(Value::as_array)
        .ok_or("the item list has no `items` array")?;
    let mut names = Vec::with_capacity(items.len());
    let mut seen = HashSet::new();
    for item in items {
        let name = match item {
            Value::String(name) => name.as_str(),
            Value::Object(o) => o
                .get("name")
                .or_else(|| o.get("metadata").and_then(|m| m.get("name")))
                .and_then(Value::as_str)
                .unwrap_or_default(),
            _ => "",
        };
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
            return Err(format!(
                "item list entry {item} is not a name (a non-empty string of at most {MAX_NAME_LEN} bytes without control characters)"
            ));
        }
        if seen.insert(name) {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// The `data` of an `Item`.
pub fn parse_item(body: &[u8]) -> Result<Value, String> {
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| format!("the item is not JSON: {e}"))?;
    check_kind(&doc, "Item")?;
    doc.get("data")
        .cloned()
        .ok_or_else(|| "the item has no `data`".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_lists_in_the_books_form_and_with_objects() {
        let names = parse_item_list(
            br#"{"kind":"ItemList","apiVersion":"v1","items":["a","b",{"name":"c"},"a",{"metadata":{"name":"d"}}]}"#,
        )
        .unwrap();
        assert_eq!(names, ["a", "b", "c", "d"]);
        let empty =
            parse_item_list(br#"{"kind":"ItemList","apiVersion":"v1","items":[]}"#).unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn malformed_lists_and_items_are_explained() {
        for (body, expect) in [
            (&br#"not json"#[..], "not JSON"),
            (
                br#"{"kind":"Item","apiVersion":"v1","items":[]}"#,
                "kind `Item`",
            ),
            (
                br#"{"kind":"ItemList","apiVersion":"v2","items":[]}"#,
                "apiVersion `v2`",
            ),
            (br#"{"kind":"ItemList","apiVersion":"v1"}"#, "no `items`"),
            (
                br#"{"kind":"ItemList","apiVersion":"v1","items":[""]}"#,
                "not a name",
            ),
            (
                br#"{"kind":"ItemList","apiVersion":"v1","items":[3]}"#,
                "not a name",
            ),
        ] {
            let err = parse_item_list(body).unwrap_err();
            assert!(err.contains(expect), "{err}");
        }
        assert_eq!(
            parse_item(br#"{"kind":"Item","apiVersion":"v1","data":{"x":1}}"#).unwrap(),
            serde_json::json!({"x": 1})
        );
        let err = parse_item(br#"{"kind":"Item","apiVersion":"v1"}"#).unwrap_err();
        assert!(err.contains("no `data`"), "{err}");
        let err = parse_item(br#"{"kind":"ItemList","apiVersion":"v1","data":{}}"#).unwrap_err();
        assert!(err.contains("kind `ItemList`"), "{err}");
    }
}
