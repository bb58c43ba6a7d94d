//! Copier throughput: mediaflow's copier stage (the stage runtime with the `copier` kind's
//! handler, as `mediaflow run` runs it) against a raw consume -> produce loop in Python's
//! `confluent-kafka` (librdkafka), on the same embedded broker, in the same run.
//!
//! usage: copier --python PY --work DIR [--events 20000] [--size 1024] [--concurrency 512]
//!
//! The concurrency defaults to what a declared linking stage gets (`stages::CONCURRENCY`).
//!
//! Both sides copy the same `events` CloudEvents of `size` bytes (binary mode: `ce_*` headers,
//! JSON payload) from a 4-partition topic to a topic of their own, at least once: mediaflow
//! publishes each copy and waits for its acknowledgement before it commits the input; the raw
//! loop produces a batch, flushes it and then commits (`benches/py/raw_copier.py`). One
//! observer times both the same way: it polls the output topic's size and takes the rate
//! between the first copy and the last, so start-up and the consumer group's join are left out
//! of both. CPU pinning is the caller's (`./x bench` runs this under `taskset`); the broker and
//! the Python peer inherit it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cloudevents::{EventBuilder, EventBuilderV10};
use mediaflow_benches::allowed_cpus;
use mediaflow_bus::{Bus, BusConfig, StartFrom};
use mediaflow_events::TopicSpec;
use mediaflow_linking::stages::Copier;
use mediaflow_runtime::{Ports, StageOptions, StageProbe, StageRun, run_stage};
use tokio_util::sync::CancellationToken;

const PARTITIONS: i32 = 4;

struct Args {
    python: PathBuf,
    work: PathBuf,
    events: usize,
    size: usize,
    concurrency: usize,
}

fn args() -> Result<Args> {
    let mut args = Args {
        python: PathBuf::from("python3"),
        work: std::env::temp_dir().join("mediaflow-copier-bench"),
        events: 20_000,
        size: 1024,
        concurrency: mediaflow_linking::stages::CONCURRENCY,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--python" => args.python = value.into(),
            "--work" => args.work = value.into(),
            "--events" => args.events = value.parse()?,
            "--size" => args.size = value.parse()?,
            "--concurrency" => args.concurrency = value.parse()?,
            _ => bail!("unknown flag {flag}"),
        }
    }
    Ok(args)
}

/// Events per second onto `topic` until it holds `events` messages, between its first message
/// and its last.
async fn rate(bus: &Bus, topic: &str, events: usize, limit: Duration) -> Result<f64> {
    let start = Instant::now();
    let mut first = None;
    loop {
        let n = usize::try_from(bus.message_count(topic).await?)?;
        let now = Instant::now();
        if n > 0 && first.is_none() {
            first = Some((now, n));
        }
        if n >= events {
            let (t0, n0) = first.unwrap_or((start, 0));
            let took = now.duration_since(t0).as_secs_f64();
            return Ok((n - n0) as f64 / took.max(1e-3));
        }
        ensure!(
            start.elapsed() < limit,
            "{topic}: {n} of {events} after {limit:?}"
        );
        // Polling the topic's size: the one observer both sides are timed by.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = args()?;
    std::fs::create_dir_all(&args.work)?;
    let dir = tempfile::tempdir_in(&args.work)?;
    let broker = mediaflow_embedded::find_broker(None)?;
    let port = mediaflow_embedded::free_port()?;
    let kafka = mediaflow_embedded::EmbeddedKafka::start(&broker, dir.path(), port).await?;
    let bus = Bus::new(BusConfig {
        brokers: kafka.bootstrap().to_owned(),
        partitions: Some(PARTITIONS),
        ..BusConfig::default()
    });
    let topic = |name: &str| TopicSpec {
        name: name.to_owned(),
        partitions: PARTITIONS,
        retention: Duration::from_secs(3600),
    };
    bus.ensure_topics(&[
        topic("bench.in"),
        topic("bench.copied"),
        topic("bench.raw"),
        topic("bench.dead"),
    ])
    .await?;

    // The input: `events` events of about `size` bytes, keyed over 1,000 keys.
    let publisher = bus.publisher("/bench")?;
    let filler = "x".repeat(args.size.saturating_sub(40));
    for chunk in (0..args.events).collect::<Vec<_>>().chunks(1000) {
        let sends = chunk.iter().map(|i| {
            let event = EventBuilderV10::new()
                .id(format!("e{i}"))
                .ty("bench.event")
                .source("/bench")
                .subject(format!("k{}", i % 1000))
                .data(
                    "application/json",
                    serde_json::json!({ "n": i, "pad": filler }),
                )
                .build();
            let publisher = &publisher;
            async move {
                publisher
                    .publish_event("bench.in", &format!("k{}", i % 1000), event?)
                    .await?;
                anyhow::Ok(())
            }
        });
        for sent in futures::future::join_all(sends).await {
            sent?;
        }
    }
    println!(
        "copier: {} events of {} bytes on {PARTITIONS} partitions; CPUs {}; mediaflow concurrency {}",
        args.events,
        args.size,
        allowed_cpus(),
        args.concurrency
    );
    let limit = Duration::from_secs(600);

    // mediaflow: the copier stage on the stage runtime.
    let shutdown = CancellationToken::new();
    let run = StageRun {
        name: "copy".into(),
        handler: Arc::new(Copier::new(["out".to_owned()])),
        sink: Arc::new(bus.publisher("/mediaflow/copy")?),
        ports: Ports::new(
            "copy",
            1,
            BTreeMap::from([("out".to_owned(), "bench.copied".to_owned())]),
        ),
        dead_letters: "bench.dead".into(),
        tracker: None,
        options: StageOptions {
            concurrency: args.concurrency,
            ..StageOptions::default()
        },
        metrics: mediaflow_telemetry::Metrics::new(),
        probe: StageProbe::new(),
    };
    let stage = {
        let (bus, shutdown) = (bus.clone(), shutdown.clone());
        tokio::spawn(async move {
            run_stage(
                run,
                |listener| {
                    bus.consumer_with(
                        "bench-copy",
                        &["bench.in".to_owned()],
                        StartFrom::Earliest,
                        listener,
                        &Default::default(),
                    )
                },
                shutdown,
            )
            .await
        })
    };
    let ours = rate(&bus, "bench.copied", args.events, limit).await?;
    shutdown.cancel();
    stage.await??;

    // The peer: confluent-kafka's consume -> produce loop.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/raw_copier.py");
    let mut peer = tokio::process::Command::new(&args.python)
        .args([
            script,
            kafka.bootstrap(),
            "bench.in",
            "bench.raw",
            &args.events.to_string(),
        ])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context(
            "running benches/py/raw_copier.py (needs confluent-kafka: ./x bench sets it up)",
        )?;
    let theirs = rate(&bus, "bench.raw", args.events, limit).await?;
    let status = peer.wait().await?;
    ensure!(status.success(), "the raw loop failed: {status}");

    println!("  mediaflow copier          {ours:>9.0} events/s");
    println!("  confluent-kafka raw loop  {theirs:>9.0} events/s");
    println!("  ratio (mediaflow / raw)   {:>9.2}x", ours / theirs);
    kafka.stop().await;
    Ok(())
}
