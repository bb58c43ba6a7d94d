//! `mediaflow tail`: prints the events on a topic as JSON lines.

use anyhow::Result;
use cloudevents::AttributesReader;
use mediaflow_bus::{Bus, StartFrom};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Prints events from `topic` until `max` were printed or `shutdown` is cancelled. Uses a fresh
/// consumer group, so it never moves a stage's offsets.
pub async fn tail(
    bus: &Bus,
    topic: &str,
    from_beginning: bool,
    max: Option<u64>,
    shutdown: CancellationToken,
    out: &mut (dyn std::io::Write + Send),
) -> Result<u64> {
    let group = format!("mediaflow-tail-{}", std::process::id());
    let start = if from_beginning {
        StartFrom::Earliest
    } else {
        StartFrom::Latest
    };
    let consumer = bus.consumer(&group, &[topic.to_owned()], start)?;
    let mut printed = 0;
    while max.is_none_or(|m| printed < m) {
        let delivery = tokio::select! {
            () = shutdown.cancelled() => break,
            d = consumer.recv() => d?,
        };
        let line = match &delivery.event {
            Ok(e) => json!({
                "topic": delivery.topic,
                "partition": delivery.partition,
                "offset": delivery.offset,
                "id": e.id(),
                "type": e.ty(),
                "source": e.source().to_string(),
                "subject": e.subject(),
                "time": e.time().map(|t| t.to_rfc3339()),
                "data": mediaflow_events::data_json(e).unwrap_or_else(|err| json!({"undecodable": err.to_string()})),
            }),
            Err(why) => json!({
                "topic": delivery.topic,
                "partition": delivery.partition,
                "offset": delivery.offset,
                "error": format!("not a CloudEvent: {why}"),
            }),
        };
        writeln!(out, "{line}")?;
        out.flush()?;
        printed += 1;
    }
    Ok(printed)
}
