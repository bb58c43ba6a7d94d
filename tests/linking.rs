//! The linking stages of ch. 11 declared in pipeline files, on the real broker: what each kind
//! does with events, the sharder routing around a stopped shard and back, a declared chain read
//! by an independent client, and redelivery making no new event ids.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use cloudevents::AttributesReader;
use support::{Backend, TestPlatform};

/// Writes `yaml` as the pipeline file of a platform about to start.
fn pipeline_file(dir: &tempfile::TempDir, yaml: &str) -> std::path::PathBuf {
    let path = dir.path().join("pipeline.yaml");
    std::fs::write(&path, yaml).expect("writing the pipeline file");
    path
}

/// Starts a platform running the pipeline `yaml`, with `adjust` on top.
async fn platform(
    files: &tempfile::TempDir,
    yaml: &str,
    adjust: impl FnOnce(&mut mediaflow::MediaflowConfig),
) -> Result<TestPlatform> {
    let path = pipeline_file(files, yaml);
    TestPlatform::start_with(Backend::Sqlite, |c| {
        c.pipeline = Some(path.into());
        adjust(c);
    })
    .await
}

fn numbers(prefix: &str, n: usize, keys: usize) -> Vec<(String, String, serde_json::Value)> {
    (0..n)
        .map(|i| {
            (
                format!("{prefix}-{i}"),
                format!("k{}", i % keys),
                serde_json::json!({ "n": i, "from": prefix }),
            )
        })
        .collect()
}

fn ids(events: &[cloudevents::Event]) -> BTreeSet<String> {
    events.iter().map(|e| e.id().to_owned()).collect()
}

fn data(e: &cloudevents::Event) -> serde_json::Value {
    mediaflow_events::data_json(e).unwrap_or_default()
}

const KINDS: &str = r#"
topics:
  - {name: in.a, produced_by: test}
  - {name: in.b, produced_by: test}
  - {name: copies.one}
  - {name: copies.two}
  - {name: kept}
  - {name: big}
  - {name: even}
  - {name: rest}
  - {name: merged}
stages:
  - name: copy
    kind: copier
    inputs: [in.a]
    outputs: {one: copies.one, two: copies.two}
  - name: keep
    kind: filter
    inputs: [in.a]
    outputs: {out: kept}
    config: {predicate: "data.n % 3 == 0"}
  - name: split
    kind: splitter
    inputs: [in.a]
    outputs: {big: big, even: even, rest: rest}
    config:
      routes: {big: "data.n >= 50", even: "data.n % 2 == 0"}
      default: rest
  - name: merge
    kind: merger
    inputs: [in.a, in.b]
    outputs: {out: merged}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn each_linking_kind_does_what_it_says_on_the_real_broker() -> Result<()> {
    let files = tempfile::tempdir()?;
    let tp = platform(&files, KINDS, |_| {}).await?;
    let a = numbers("a", 100, 7);
    let b = numbers("b", 100, 7);
    tp.publish_json("in.a", "test.number", &a).await?;
    tp.publish_json("in.b", "test.number", &b).await?;
    for (stage, input) in [
        ("copy", "in.a"),
        ("keep", "in.a"),
        ("split", "in.a"),
        ("merge", "in.a"),
        ("merge", "in.b"),
    ] {
        tp.wait_caught_up(stage, input).await?;
    }
    let all_a: BTreeSet<String> = a.iter().map(|(id, ..)| id.clone()).collect();
    let where_n = |f: fn(usize) -> bool| -> BTreeSet<String> {
        (0..100)
            .filter(|n| f(*n))
            .map(|n| format!("a-{n}"))
            .collect()
    };

    // copier: every event on every port, unchanged.
    for topic in ["copies.one", "copies.two"] {
        let copies = tp.events(topic).await?;
        ensure!(copies.len() == 100, "{topic}: {} events", copies.len());
        ensure!(ids(&copies) == all_a, "{topic} holds other events");
        let sample = copies.iter().find(|e| e.id() == "a-42").context("a-42")?;
        ensure!(sample.subject() == Some("k0") && *sample.source() == "/mediaflow/copy");
        ensure!(data(sample) == serde_json::json!({"n": 42, "from": "a"}));
    }

    // filter: exactly the matching events.
    let kept = tp.events("kept").await?;
    ensure!(kept.len() == 34, "kept {} events", kept.len());
    ensure!(ids(&kept) == where_n(|n| n % 3 == 0));

    // splitter: a copy on every matching port, the default port otherwise.
    let big = tp.events("big").await?;
    let even = tp.events("even").await?;
    let rest = tp.events("rest").await?;
    ensure!(big.len() == 50 && ids(&big) == where_n(|n| n >= 50));
    ensure!(even.len() == 50 && ids(&even) == where_n(|n| n % 2 == 0));
    ensure!(rest.len() == 25 && ids(&rest) == where_n(|n| n < 50 && n % 2 == 1));

    // merger: both inputs, each input's per-key order kept.
    let merged = tp.events("merged").await?;
    ensure!(merged.len() == 200, "merged {} events", merged.len());
    let mut last: HashMap<(String, String), i64> = HashMap::new();
    for e in &merged {
        let d = data(e);
        let from = d["from"].as_str().context("from")?.to_owned();
        let n = d["n"].as_i64().context("n")?;
        let key = (from, e.subject().context("subject")?.to_owned());
        if let Some(before) = last.insert(key.clone(), n) {
            ensure!(before < n, "{key:?}: {n} came after {before}");
        }
    }

    // Drops are counted, outputs counted per port.
    ensure!(
        tp.metric(r#"mediaflow_stage_dropped_total{stage="keep"}"#)
            .await?
            == 66.0
    );
    ensure!(
        tp.metric(r#"mediaflow_stage_outputs_total{stage="split",port="even"}"#)
            .await?
            == 50.0
    );
    tp.stop().await
}

const SHARDS: &str = r#"
topics:
  - {name: keys, produced_by: test}
  - {name: shard.0}
  - {name: shard.1}
  - {name: shard.2}
  - {name: shard.3}
  - {name: done.0}
  - {name: done.1}
  - {name: done.2}
  - {name: done.3}
stages:
  - name: shard
    kind: sharder
    concurrency: 500
    inputs: [keys]
    outputs: {shard-0: shard.0, shard-1: shard.1, shard-2: shard.2, shard-3: shard.3}
    config: {key: subject, shards: 4, unhealthy_after_secs: 3}
  - {name: reader-0, kind: copier, concurrency: 500, inputs: [shard.0], outputs: {out: done.0}}
  - {name: reader-1, kind: copier, concurrency: 500, inputs: [shard.1], outputs: {out: done.1}}
  - {name: reader-2, kind: copier, concurrency: 500, inputs: [shard.2], outputs: {out: done.2}}
  - {name: reader-3, kind: copier, concurrency: 500, inputs: [shard.3], outputs: {out: done.3}}
"#;

/// Which shard topic each event id is on now.
async fn shard_of(tp: &TestPlatform) -> Result<BTreeMap<String, usize>> {
    let mut on = BTreeMap::new();
    for shard in 0..4 {
        for e in tp.events(&format!("shard.{shard}")).await? {
            ensure!(
                on.insert(e.id().to_owned(), shard).is_none(),
                "{} is on two shards",
                e.id()
            );
        }
    }
    Ok(on)
}

/// Polls the sharder's health metric for shard 2 until it reads `healthy`.
async fn wait_shard_2(tp: &TestPlatform, healthy: bool, timeout: Duration) -> Result<Duration> {
    let series = r#"mediaflow_sharder_shard_healthy{stage="shard",port="shard-2"}"#;
    let start = Instant::now();
    loop {
        if (tp.metric(series).await? == 1.0) == healthy {
            return Ok(start.elapsed());
        }
        ensure!(
            start.elapsed() < timeout,
            "shard 2 not {} after {timeout:?}",
            if healthy { "healthy" } else { "unhealthy" }
        );
        // Polling the metric the sharder's health watch updates.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sharder_spreads_keys_routes_around_a_stopped_shard_and_back() -> Result<()> {
    let files = tempfile::tempdir()?;
    // Shard 2's reader runs as its own process, to be stopped and started again.
    let tp = platform(&files, SHARDS, |c| {
        c.stages.enabled = Some(
            ["shard", "reader-0", "reader-1", "reader-3"]
                .map(str::to_owned)
                .to_vec(),
        );
    })
    .await?;
    let workers = tempfile::tempdir()?;
    let mut reader_2 = tp.spawn_stage("reader-2", "reader-2", workers.path(), &[])?;

    // 10,000 events, 4 per key: each key on one shard, the shards within 10% of even.
    let first = numbers("first", 10_000, 2_500);
    tp.publish_json("keys", "test.user", &first).await?;
    tp.wait_caught_up_within("shard", "keys", Duration::from_secs(300))
        .await?;
    let on = shard_of(&tp).await?;
    ensure!(on.len() == 10_000, "{} of 10,000 events sharded", on.len());
    let mut home: HashMap<String, usize> = HashMap::new();
    let mut per_shard = [0usize; 4];
    for (id, subject, _) in &first {
        let shard = on[id];
        per_shard[shard] += 1;
        let was = *home.entry(subject.clone()).or_insert(shard);
        ensure!(was == shard, "key {subject} on shards {was} and {shard}");
    }
    for n in per_shard {
        ensure!((2_250..=2_750).contains(&n), "spread {per_shard:?}");
    }
    for shard in [0, 1, 3] {
        tp.wait_caught_up(&format!("reader-{shard}"), &format!("shard.{shard}"))
            .await?;
    }
    tp.wait_caught_up("reader-2", "shard.2").await?;

    // Shard 2's reader stops; events keep coming: within the configured time (3 s, judged
    // every 0.75 s) its keys go elsewhere.
    reader_2.kill().await?;
    let stopped = Instant::now();
    let mut batch = 0;
    while tp
        .metric(r#"mediaflow_sharder_shard_healthy{stage="shard",port="shard-2"}"#)
        .await?
        == 1.0
    {
        ensure!(
            stopped.elapsed() < Duration::from_secs(60),
            "shard 2 still healthy a minute after its reader stopped"
        );
        tp.publish_json(
            "keys",
            "test.user",
            &numbers(&format!("probe{batch}"), 50, 2_500),
        )
        .await?;
        batch += 1;
    }
    let detected = stopped.elapsed();
    eprintln!("shard 2 routed around {detected:?} after its reader stopped");
    ensure!(
        detected < Duration::from_secs(20),
        "took {detected:?} (configured: 3 s)"
    );
    let second = numbers("second", 2_500, 2_500);
    tp.publish_json("keys", "test.user", &second).await?;
    tp.wait_caught_up("shard", "keys").await?;
    let on = shard_of(&tp).await?;
    let mut moved_to = [0usize; 4];
    for (id, subject, _) in &second {
        let (now, was) = (on[id], home[subject]);
        if was == 2 {
            ensure!(now != 2, "{subject} still sent to the stopped shard");
            moved_to[now] += 1;
        } else {
            ensure!(
                now == was,
                "{subject} moved from healthy shard {was} to {now}"
            );
        }
    }
    // Its keys spread over the other shards, not onto one neighbour.
    ensure!(
        moved_to.iter().filter(|n| **n > 0).count() == 3,
        "{moved_to:?}"
    );

    // The reader comes back, works off what waited for it, and the keys return.
    let _reader_2 = tp.spawn_stage("reader-2", "reader-2-again", workers.path(), &[])?;
    wait_shard_2(&tp, true, Duration::from_secs(120)).await?;
    let third = numbers("third", 2_500, 2_500);
    tp.publish_json("keys", "test.user", &third).await?;
    tp.wait_caught_up("shard", "keys").await?;
    let on = shard_of(&tp).await?;
    for (id, subject, _) in &third {
        ensure!(on[id] == home[subject], "{subject} did not return home");
    }

    // None lost: every event published is on a shard, and read from it.
    let published = 10_000 + 2_500 * 2 + 50 * batch;
    ensure!(
        on.len() == published,
        "{} of {published} on shards",
        on.len()
    );
    for shard in 0..4 {
        tp.wait_caught_up_within(
            &format!("reader-{shard}"),
            &format!("shard.{shard}"),
            Duration::from_secs(300),
        )
        .await?;
    }
    let mut done = 0;
    for shard in 0..4 {
        done += ids(&tp.events(&format!("done.{shard}")).await?).len();
    }
    ensure!(done == published, "{done} of {published} read");
    tp.stop().await
}

/// A chain declared in a test file: uploads are split by kind, images go through an exec stage,
/// whose results a copier sends to two topics that two consumers read.
const CHAIN: &str = r#"
topics:
  - {name: media.uploaded, produced_by: gateway}
  - {name: images, key: media id}
  - {name: others}
  - {name: sized}
  - {name: to.archive}
  - {name: to.search}
  - {name: archived}
  - {name: indexed}
stages:
  - name: route
    kind: splitter
    inputs: [media.uploaded]
    outputs: {image: images, other: others}
    config:
      routes: {image: 'data.kind == "image"'}
      default: other
  - name: size
    kind: exec
    inputs: [images]
    outputs: {out: sized}
    config:
      command: ["sh", "-c", "wc -c < \"$INPUT_FILE\" > \"$OUTPUT_DIR/size.txt\""]
  - name: fan-out
    kind: copier
    inputs: [sized]
    outputs: {archive: to.archive, search: to.search}
  - {name: archive, kind: copier, inputs: [to.archive], outputs: {out: archived}}
  - {name: search, kind: copier, inputs: [to.search], outputs: {out: indexed}}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_declared_chain_runs_end_to_end_and_an_independent_client_reads_it() -> Result<()> {
    let files = tempfile::tempdir()?;
    let tp = platform(&files, CHAIN, |_| {}).await?;
    let uploaded = upload_three(&tp).await?;
    for topic in ["archived", "indexed"] {
        let read = tp.read_with_kafka_python(topic, uploaded.len()).await?;
        let mut seen = BTreeMap::new();
        let copier = if topic == "archived" {
            "archive"
        } else {
            "search"
        };
        for msg in &read {
            ensure!(msg["headers"]["ce_type"] == "mediaflow.media.processed");
            // Each stage it passed through is its source in turn; its payload names its maker.
            ensure!(msg["headers"]["ce_source"] == format!("/mediaflow/{copier}"));
            ensure!(msg["data"]["stage"] == "size", "{msg}");
            let media = msg["data"]["media_id"].as_str().context("media_id")?;
            let output = &msg["data"]["outputs"][0];
            ensure!(output["name"] == "size.txt", "{msg}");
            seen.insert(media.to_owned(), output["object"]["key"].clone());
        }
        ensure!(
            seen.keys().collect::<Vec<_>>() == uploaded.keys().collect::<Vec<_>>(),
            "{topic}: {seen:?}"
        );
    }
    // The command saw each original: its output holds the upload's size.
    let s3 = tp.s3_client();
    for (id, size) in &uploaded {
        let key = format!("derived/{id}/size/v1/size.txt");
        let body = s3
            .get_object()
            .bucket(&tp.config.store.bucket)
            .key(&key)
            .send()
            .await
            .with_context(|| key.clone())?
            .body
            .collect()
            .await?
            .into_bytes();
        ensure!(String::from_utf8_lossy(&body).trim() == size.to_string());
    }
    ensure!(tp.events("others").await?.is_empty());
    tp.stop().await
}

/// Uploads three images through the gateway; their media ids and sizes.
async fn upload_three(tp: &TestPlatform) -> Result<BTreeMap<String, usize>> {
    let client = reqwest::Client::new();
    let mut uploaded = BTreeMap::new();
    for name in ["rocket.jpg", "chelsea.png", "coffee.png"] {
        let bytes = std::fs::read(support::fixtures().join(name))?;
        let size = bytes.len();
        let form = reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(bytes).file_name(name),
        );
        let r = client
            .post(format!("{}/v1/media", tp.base))
            .multipart(form)
            .send()
            .await?;
        ensure!(r.status().is_success(), "upload {name}: {}", r.status());
        let body: serde_json::Value = r.json().await?;
        let id = body["id"].as_str().context("media id")?.to_owned();
        uploaded.insert(id, size);
    }
    Ok(uploaded)
}

#[tokio::test(flavor = "multi_thread")]
async fn redelivering_every_input_makes_no_event_with_a_new_id() -> Result<()> {
    let files = tempfile::tempdir()?;
    // The stages run as their own processes, so they can be stopped and their groups rewound.
    let tp = platform(&files, CHAIN, |c| c.stages.enabled = Some(Vec::new())).await?;
    upload_three(&tp).await?;
    let workers = tempfile::tempdir()?;
    let prefix = tp.config.bus.topic_prefix.clone();
    let chain = [
        ("route", "media.uploaded"),
        ("size", "images"),
        ("fan-out", "sized"),
    ];
    let outputs = ["images", "sized", "to.archive", "to.search"];
    let mut before: BTreeMap<&str, (usize, BTreeSet<String>)> = BTreeMap::new();
    for round in 0..2 {
        let mut running = Vec::new();
        for (stage, _) in chain {
            running.push(tp.spawn_stage(
                stage,
                &format!("{stage}-{round}"),
                workers.path(),
                &[],
            )?);
        }
        for (stage, input) in chain {
            tp.wait_caught_up(stage, input).await?;
        }
        for mut stage in running {
            // A clean stop (SIGTERM): the stage drains and leaves its group.
            let pid = stage.id().context("pid")?;
            std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()?;
            stage.wait().await?;
        }
        for topic in outputs {
            let events = tp.events(topic).await?;
            let these = ids(&events);
            if round == 0 {
                ensure!(these.len() == 3, "{topic}: {} ids", these.len());
                ensure!(events.len() == 3, "{topic}: duplicates already");
                before.insert(topic, (events.len(), these));
            } else {
                // Everything was handled again: more events, the same ids.
                ensure!(
                    events.len() > before[topic].0,
                    "{topic}: nothing redelivered"
                );
                ensure!(
                    these == before[topic].1,
                    "{topic}: new ids after redelivery"
                );
            }
        }
        if round == 0 {
            for (stage, input) in chain {
                tp.bus
                    .rewind_group(&format!("{prefix}{stage}"), &[format!("{prefix}{input}")])
                    .await?;
            }
        }
    }
    tp.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_pipeline_file_starts_nothing_and_says_where_it_is_wrong() -> Result<()> {
    let files = tempfile::tempdir()?;
    let wrong = KINDS.replace("kind: merger", "kind: joiner");
    let path = pipeline_file(&files, &wrong);
    let mut config = mediaflow::MediaflowConfig::with_defaults();
    config.data_dir = files.path().join("data");
    config.pipeline = Some(path.clone().into());
    let err = mediaflow::Platform::start(config)
        .await
        .err()
        .context("a platform started on a wrong pipeline")?;
    let message = format!("{err:#}");
    let line = wrong
        .lines()
        .position(|l| l.contains("joiner"))
        .context("the line")?
        + 1;
    ensure!(
        message.contains(&format!("{}:{line}:", path.display())),
        "{message}"
    );
    ensure!(message.contains("unknown stage kind `joiner`"), "{message}");
    // Nothing was started: not even the data folder of the embedded services.
    ensure!(!files.path().join("data").exists(), "{message}");
    Ok(())
}
