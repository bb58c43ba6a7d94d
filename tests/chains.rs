//! Multi-worker chains (ch. 10) on the real broker, S3 server and database: the shipped
//! `pipelines/chains.yaml` runs `probe -> thumbnail -> tag` on photos and `probe -> thumbnail`
//! on clips (the same workers in two chains); a command step changes the file the steps after
//! it see and reads the results before it; an exec stage reads a chain's results and another
//! system's events; a broken image is dead-lettered naming the step, and the next one flows.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use cloudevents::AttributesReader;
use image::GenericImageView;
use mediaflow_events::{EventData, ImageProcessed, ItemProcessed, MediaProcessed};
use mediaflow_gateway::MediaView;
use support::{Backend, TestPlatform, fixtures};

const TIMEOUT: Duration = Duration::from_secs(120);

async fn platform(files: &tempfile::TempDir, yaml: &str) -> Result<TestPlatform> {
    let path = files.path().join("pipeline.yaml");
    std::fs::write(&path, yaml)?;
    TestPlatform::start_with(Backend::Sqlite, |c| c.pipeline = Some(path.into())).await
}

async fn upload(tp: &TestPlatform, bytes: Vec<u8>) -> Result<String> {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/media", tp.base))
        .body(bytes)
        .send()
        .await?;
    ensure!(r.status() == 202, "upload: {}", r.status());
    let body: serde_json::Value = r.json().await?;
    Ok(body["id"].as_str().context("media id")?.to_owned())
}

async fn object(tp: &TestPlatform, key: &str) -> Result<Vec<u8>> {
    Ok(tp
        .s3_client()
        .get_object()
        .bucket(&tp.config.store.bucket)
        .key(key)
        .send()
        .await
        .with_context(|| key.to_owned())?
        .body
        .collect()
        .await?
        .to_vec())
}

/// The one event of `T` on `topic`, checked against its schema.
async fn one<T: EventData>(tp: &TestPlatform, topic: &str) -> Result<T> {
    let events = tp.read_events(topic, 1, TIMEOUT).await?;
    let data = mediaflow_events::data_json(&events[0])?;
    mediaflow_events::schema::validate(T::TYPE, &data).map_err(anyhow::Error::msg)?;
    Ok(mediaflow_events::decode(&events[0])?)
}

fn step<'a>(result: &'a MediaProcessed, name: &str) -> &'a serde_json::Value {
    &result
        .steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step `{name}`"))
        .result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_shipped_chains_reuse_workers_on_photos_and_clips() -> Result<()> {
    // The shipped file, with the image stage also reading the photo queue: the chain's
    // workers are checked against it on the same upload.
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/chains.yaml"),
    )?;
    let yaml = shipped.replace("\nstages:\n", "  - name: images.processed\n\nstages:\n")
        + "\n  - name: reference\n    kind: image\n    version: 7\n    inputs: [jobs.image]\n    outputs:\n      out: images.processed\n";
    let files = tempfile::tempdir()?;
    let tp = platform(&files, &yaml).await?;

    let photo_path = fixtures().join("exif").join("large.jpg");
    let photo = upload(&tp, std::fs::read(&photo_path)?).await?;
    let clip = upload(
        &tp,
        std::fs::read(fixtures().join("video").join("upright.mp4"))?,
    )
    .await?;

    let photos: MediaProcessed = one(&tp, "photos.processed").await?;
    let reference: ImageProcessed = one(&tp, "images.processed").await?;
    ensure!(photos.media_id == photo && reference.media_id == photo);
    // The image stage writes under its declared name and version.
    ensure!((reference.stage.as_str(), reference.stage_version.as_str()) == ("reference", "7"));
    let prefix = format!("derived/{photo}/reference/v7/");
    ensure!(
        reference
            .renditions
            .iter()
            .all(|r| r.object.key.starts_with(&prefix)),
        "{:?}",
        reference.renditions
    );
    let names: Vec<_> = photos
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.worker.as_str()))
        .collect();
    ensure!(
        names
            == [
                ("probe", "probe"),
                ("thumbnail", "thumbnail"),
                ("tag", "tag")
            ],
        "{names:?}"
    );

    // probe: the stored size, as an independent decoder reads it.
    let (w, h) = image::image_dimensions(&photo_path)?;
    let probe = step(&photos, "probe");
    ensure!(
        probe["kind"] == "image" && probe["format"] == "jpeg",
        "{probe}"
    );
    ensure!(
        (probe["width"].as_u64(), probe["height"].as_u64()) == (Some(w.into()), Some(h.into())),
        "{probe}"
    );

    // thumbnail: each declared rendition, stored where its reference says, of its box.
    let renditions = step(&photos, "thumbnail")["renditions"]
        .as_array()
        .context("renditions")?
        .clone();
    ensure!(renditions.len() == 2);
    for (r, (name, side, format)) in renditions
        .iter()
        .zip([("small", 320, "jpeg"), ("square", 128, "webp")])
    {
        ensure!(r["name"] == name && r["format"] == format, "{r}");
        let key = r["object"]["key"].as_str().context("key")?;
        let ext = if format == "jpeg" { "jpg" } else { format };
        ensure!(
            key == format!("derived/{photo}/photos/v1/thumbnail/{name}.{ext}"),
            "{key}"
        );
        let decoded = image::load_from_memory(&object(&tp, key).await?)?;
        let (dw, dh) = decoded.dimensions();
        ensure!(
            (u64::from(dw), u64::from(dh))
                == (
                    r["width"].as_u64().unwrap_or(0),
                    r["height"].as_u64().unwrap_or(0)
                )
        );
        ensure!(dw.max(dh) == side, "{name}: {dw}x{dh}");
    }
    ensure!(
        renditions[1]["width"] == 128 && renditions[1]["height"] == 128,
        "fill makes the box"
    );

    // tag: stored as tags.json, and what the image stage finds of the same photo.
    let tags = step(&photos, "tag");
    let stored: serde_json::Value = serde_json::from_slice(
        &object(&tp, &format!("derived/{photo}/photos/v1/tag/tags.json")).await?,
    )?;
    ensure!(&stored == tags);
    ensure!(
        tags["exif"] == reference.tags["exif"] && tags["exif"]["make"].is_string(),
        "{tags}"
    );
    ensure!(tags["width"] == reference.source_width && tags["height"] == reference.source_height);
    let phash = |t: &serde_json::Value| u64::from_str_radix(t["phash"].as_str().unwrap_or(""), 16);
    let apart = mediaflow_imaging::tags::hamming(phash(tags)?, phash(&reference.tags)?);
    ensure!(apart <= 6, "perceptual hashes {apart} bits apart");
    let outputs: Vec<_> = photos.outputs.iter().map(|o| o.name.as_str()).collect();
    ensure!(
        outputs
            == [
                "thumbnail.small.jpg",
                "thumbnail.square.webp",
                "tag.tags.json"
            ],
        "{outputs:?}"
    );

    // The clip went through the other chain: the same workers on a video.
    let clips: MediaProcessed = one(&tp, "clips.processed").await?;
    ensure!(clips.media_id == clip);
    let probe = step(&clips, "probe");
    ensure!(
        probe["kind"] == "video" && probe["duration_s"].as_f64().unwrap_or(0.0) > 0.5,
        "{probe}"
    );
    let frames = step(&clips, "thumbnail")["frames"]
        .as_array()
        .context("frames")?
        .clone();
    ensure!(frames.len() == 3, "{frames:?}");
    let mut last = -1.0;
    for (i, f) in frames.iter().enumerate() {
        let t = f["time_s"].as_f64().context("time")?;
        ensure!(t > last, "frames in time order");
        last = t;
        let r = &f["renditions"][0];
        let key = r["object"]["key"].as_str().context("key")?;
        ensure!(
            key == format!(
                "derived/{clip}/clips/v1/thumbnail/frame-{:02}-small.jpg",
                i + 1
            )
        );
        let decoded = image::load_from_memory(&object(&tp, key).await?)?;
        ensure!(decoded.width().max(decoded.height()) <= 320);
    }

    // Each media's status shows its own stages, done.
    tp.wait_final(&[&photo, &clip], TIMEOUT).await?;
    let view: MediaView = reqwest::get(format!("{}/v1/media/{photo}", tp.base))
        .await?
        .json()
        .await?;
    let stages: BTreeMap<_, _> = view
        .stages
        .iter()
        .map(|s| (s.stage.as_str(), s.state))
        .collect();
    for stage in ["photos", "reference"] {
        ensure!(
            stages.get(stage) == Some(&mediaflow_db::StageState::Done),
            "{stages:?}"
        );
    }
    ensure!(
        view.status == mediaflow_db::MediaStatus::Done,
        "{:?}",
        view.status
    );
    ensure!(
        view.results.iter().any(|r| r.name == "thumbnail.small.jpg"),
        "{:?}",
        view.results
    );
    tp.stop().await
}

/// Turns the chain's file grey (for the steps after it) and reports what it saw before it.
const GREY: &str = r#"
import json, os
from PIL import Image
steps = json.load(open(os.environ["RESULTS_FILE"]))
Image.open(os.environ["INPUT_FILE"]).convert("L").save(os.environ["NEXT_FILE"], "PNG")
out = os.environ["OUTPUT_DIR"]
json.dump({"probe_width": steps[0]["result"]["width"], "before": [s["name"] for s in steps]},
          open(os.path.join(out, "result.json"), "w"))
open(os.path.join(out, "note.txt"), "w").write(os.environ["STEP"] + " " + os.environ["MEDIA_KIND"])
"#;

/// An exec stage on any event: what it got, its type, and the size of the object it refers to.
const SEEN: &str = r#"cp "$WORK_ITEM_FILE" "$OUTPUT_DIR/seen.json"
printf %s "$EVENT_TYPE" > "$OUTPUT_DIR/type.txt"
if [ -n "${INPUT_FILE:-}" ]; then wc -c < "$INPUT_FILE" | tr -d ' \n' > "$OUTPUT_DIR/size.txt"; fi"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_step_changes_the_file_and_exec_stages_read_any_event() -> Result<()> {
    let python = support::python();
    let yaml = format!(
        r#"
topics:
  - {{name: media.uploaded, produced_by: gateway}}
  - {{name: described}}
  - {{name: orders, produced_by: shop}}
  - {{name: seen}}
stages:
  - name: describe
    kind: chain
    inputs: [media.uploaded]
    outputs: {{out: described}}
    config:
      steps:
        - worker: probe
        - worker: exec
          name: grey
          config:
            command: [{python}, -c, {grey}]
        - worker: thumbnail
          config:
            renditions: [{{name: small, width: 64, height: 64, format: png}}]
        - worker: tag
  - name: look
    kind: exec
    inputs: [described, orders]
    outputs: {{out: seen}}
    config:
      command: [sh, -c, {seen}]
"#,
        python = serde_json::to_string(&python.display().to_string())?,
        grey = serde_json::to_string(GREY)?,
        seen = serde_json::to_string(SEEN)?,
    );
    let files = tempfile::tempdir()?;
    let tp = platform(&files, &yaml).await?;
    let colour = std::fs::read(fixtures().join("chelsea.png"))?;
    let size = colour.len();
    let (width, _) = image::load_from_memory(&colour)?.dimensions();
    let id = upload(&tp, colour).await?;

    let described: MediaProcessed = one(&tp, "described").await?;
    let names: Vec<_> = described.steps.iter().map(|s| s.name.as_str()).collect();
    ensure!(names == ["probe", "grey", "thumbnail", "tag"], "{names:?}");
    // The command read the results before it, and its own result is what it wrote.
    ensure!(
        step(&described, "grey") == &serde_json::json!({"probe_width": width, "before": ["probe"]})
    );
    let note = object(&tp, &format!("derived/{id}/describe/v1/grey/note.txt")).await?;
    ensure!(note == b"grey image");
    // The steps after it worked on the grey file: a grey thumbnail, grey dominant colours.
    let small = &step(&described, "thumbnail")["renditions"][0]["object"]["key"];
    let small =
        image::load_from_memory(&object(&tp, small.as_str().context("key")?).await?)?.to_rgb8();
    ensure!(
        small.pixels().all(|p| p[0] == p[1] && p[1] == p[2]),
        "the thumbnail has colour"
    );
    let colours = step(&described, "tag")["colours"]
        .as_array()
        .context("colours")?
        .clone();
    ensure!(!colours.is_empty());
    for c in &colours {
        let hex = c["hex"].as_str().context("hex")?;
        ensure!(
            hex[1..3] == hex[3..5] && hex[3..5] == hex[5..7],
            "{hex} is not grey"
        );
    }

    // Another system's event on a topic the same exec stage reads.
    tp.publish_json(
        "orders",
        "com.example.order.placed",
        &[(
            "o-1".into(),
            "order-1".into(),
            serde_json::json!({"total": 12}),
        )],
    )
    .await?;
    let seen = tp.read_events("seen", 2, TIMEOUT).await?;
    let (mut media, mut items) = (Vec::new(), Vec::new());
    for e in &seen {
        match e.ty() {
            MediaProcessed::TYPE => media.push(mediaflow_events::decode::<MediaProcessed>(e)?),
            ItemProcessed::TYPE => items.push(mediaflow_events::decode::<ItemProcessed>(e)?),
            other => anyhow::bail!("unexpected {other}"),
        }
    }
    ensure!(media.len() == 1 && items.len() == 1);
    // The chain's result: the command got its data, its type, and the original it names.
    let look = &media[0];
    ensure!(look.media_id == id && look.stage == "look" && look.input == described.input);
    let key = |name: &str| format!("derived/{id}/look/v1/{name}");
    let got: serde_json::Value = serde_json::from_slice(&object(&tp, &key("seen.json")).await?)?;
    ensure!(got == serde_json::to_value(&described)?, "{got}");
    ensure!(object(&tp, &key("type.txt")).await? == MediaProcessed::TYPE.as_bytes());
    ensure!(object(&tp, &key("size.txt")).await? == size.to_string().as_bytes());
    // The order: an item named by its subject, its data as the command's work item.
    let order = &items[0];
    ensure!(
        (
            order.item_id.as_str(),
            order.name.as_str(),
            order.source.as_str()
        ) == ("order-1", "com.example.order.placed", "/test"),
        "{order:?}"
    );
    let names: Vec<_> = order.outputs.iter().map(|o| o.name.as_str()).collect();
    ensure!(names == ["seen.json", "type.txt"], "{names:?}");
    let got: serde_json::Value =
        serde_json::from_slice(&object(&tp, &order.outputs[0].object.key).await?)?;
    ensure!(got == serde_json::json!({"total": 12}));
    tp.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_image_is_dead_lettered_naming_its_step_and_the_next_flows() -> Result<()> {
    let yaml = r#"
topics:
  - {name: media.uploaded, produced_by: gateway}
  - {name: done}
stages:
  - name: photos
    kind: chain
    inputs: [media.uploaded]
    outputs: {out: done}
    config:
      steps: [{worker: probe}, {worker: thumbnail}, {worker: tag}]
"#;
    let files = tempfile::tempdir()?;
    let tp = TestPlatform::start_with(Backend::Sqlite, |c| {
        let path = files.path().join("pipeline.yaml");
        std::fs::write(&path, yaml).expect("pipeline file");
        c.pipeline = Some(path.into());
        c.bus.partitions = Some(1);
    })
    .await?;
    // Its headers are whole (probe passes); its pixels stop halfway.
    let rocket = std::fs::read(fixtures().join("rocket.jpg"))?;
    let broken = upload(&tp, rocket[..rocket.len() / 2].to_vec()).await?;
    let good = upload(&tp, std::fs::read(fixtures().join("coffee.png"))?).await?;
    let done: MediaProcessed = one(&tp, "done").await?;
    ensure!(done.media_id == good);
    let letters = tp.read_events("dead-letters", 1, TIMEOUT).await?;
    let letter: mediaflow_events::DeadLetter = mediaflow_events::decode(&letters[0])?;
    ensure!(
        letter.stage == "photos" && letter.error_class == "bad_input",
        "{letter:?}"
    );
    ensure!(
        letter.error.contains("step `thumbnail` (thumbnail)"),
        "{}",
        letter.error
    );
    // Each step's time and outcome is measured.
    let platform = &tp;
    let count = |step: &str, outcome: &str| {
        let series = format!(
            r#"mediaflow_chain_step_seconds_count{{stage="photos",step="{step}",outcome="{outcome}"}}"#
        );
        async move { platform.metric(&series).await }
    };
    ensure!(count("probe", "ok").await? == 2.0);
    ensure!(count("thumbnail", "bad_input").await? == 1.0);
    ensure!(count("thumbnail", "ok").await? == 1.0 && count("tag", "ok").await? == 1.0);
    tp.wait_final(&[&broken, &good], TIMEOUT).await?;
    let view: MediaView = reqwest::get(format!("{}/v1/media/{broken}", tp.base))
        .await?
        .json()
        .await?;
    ensure!(
        view.status == mediaflow_db::MediaStatus::Failed,
        "{:?}",
        view.status
    );
    tp.stop().await
}
