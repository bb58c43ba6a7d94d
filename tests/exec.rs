//! The book's worker interface: a shell script run as a stage. It reads `WORK_ITEM_FILE` and
//! `INPUT_FILE`, writes into `OUTPUT_DIR`; its outputs are stored, recorded and announced, and its
//! exit status decides the error class. What it leaves running ends with the job.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::Result;
use mediaflow_events::{EventData, MediaProcessed};
use support::{Backend, TestPlatform, fixtures};

const SCRIPT: &str = r#"#!/bin/sh
set -eu
case "$INPUT_FILE" in
  *.png) echo "sizer takes no PNGs" >&2; exit 65 ;;
esac
# Left running in the background: it must not hold the job open or outlive it.
sleep 300 &
echo $! > "$(dirname "$0")/background.pid"
media=$(sed -n 's/.*"media_id": *"\([^"]*\)".*/\1/p' "$WORK_ITEM_FILE")
[ "$media" = "$MEDIA_ID" ] || { echo "item and MEDIA_ID disagree" >&2; exit 1; }
wc -c < "$INPUT_FILE" | tr -d ' ' > "$OUTPUT_DIR/size.txt"
cp "$WORK_ITEM_FILE" "$OUTPUT_DIR/item.json"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shell_script_runs_as_a_stage() -> Result<()> {
    let scripts = tempfile::tempdir()?;
    let script = scripts.path().join("sizer.sh");
    std::fs::write(&script, SCRIPT)?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    let tp = TestPlatform::start_with(Backend::Sqlite, |c| {
        c.exec.push(support::exec_stage("sizer", &script));
    })
    .await?;
    let http = reqwest::Client::new();
    let jpeg = std::fs::read(fixtures().join("rocket.jpg"))?;
    let jpeg_len = jpeg.len();
    let accepted: mediaflow_gateway::Accepted = http
        .post(format!("{}/v1/media", tp.base))
        .body(jpeg)
        .send()
        .await?
        .json()
        .await?;
    let png = std::fs::read(fixtures().join("chelsea.png"))?;
    let refused: mediaflow_gateway::Accepted = http
        .post(format!("{}/v1/media", tp.base))
        .body(png)
        .send()
        .await?
        .json()
        .await?;

    // The JPEG's outputs are announced, stored and valid against the schema.
    let events = tp
        .read_events("media.processed", 1, Duration::from_secs(60))
        .await?;
    let data = mediaflow_events::data_json(&events[0])?;
    mediaflow_events::schema::validate(MediaProcessed::TYPE, &data).map_err(anyhow::Error::msg)?;
    let result: MediaProcessed = mediaflow_events::decode(&events[0])?;
    assert_eq!(
        (result.media_id.as_str(), result.stage.as_str()),
        (accepted.id.as_str(), "sizer")
    );
    let names: Vec<&str> = result.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["item.json", "size.txt"]);
    let s3 = tp.s3_client();
    let fetch = |key: String| {
        let s3 = s3.clone();
        let bucket = tp.config.store.bucket.clone();
        async move {
            let o = s3.get_object().bucket(bucket).key(key).send().await?;
            anyhow::Ok(o.body.collect().await?.into_bytes())
        }
    };
    let size = fetch(result.outputs[1].object.key.clone()).await?;
    assert_eq!(
        String::from_utf8(size.to_vec())?.trim(),
        jpeg_len.to_string()
    );
    let item: serde_json::Value =
        serde_json::from_slice(&fetch(result.outputs[0].object.key.clone()).await?)?;
    assert_eq!(item["media_id"], accepted.id);
    assert_eq!(
        result.outputs[0].object.key,
        format!("derived/{}/sizer/v1/item.json", accepted.id)
    );

    // The job ended when the script did: what it left in the background was stopped with it.
    let pid = std::fs::read_to_string(scripts.path().join("background.pid"))?;
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
    let state = stat.rsplit(") ").next().and_then(|r| r.chars().next());
    assert!(
        matches!(state, None | Some('Z' | 'X')),
        "the background process {} still runs: {stat}",
        pid.trim()
    );

    // The PNG: exit 65 is bad input, dead-lettered once with what the script said.
    tp.wait_caught_up("router", "media.uploaded").await?;
    tp.wait_caught_up("sizer", "jobs.image").await?;
    let letters = tp
        .bus
        .read_to_end(&format!("{}dead-letters", tp.config.bus.topic_prefix))
        .await?;
    let letters: Vec<mediaflow_events::DeadLetter> = letters
        .iter()
        .filter_map(|d| d.event.as_ref().ok())
        .map(mediaflow_events::decode)
        .collect::<Result<_, _>>()?;
    let sizer: Vec<_> = letters.iter().filter(|l| l.stage == "sizer").collect();
    assert_eq!(sizer.len(), 1, "{letters:?}");
    assert_eq!(
        (sizer[0].error_class.as_str(), sizer[0].attempts),
        ("bad_input", 1)
    );
    assert!(
        sizer[0].error.contains("sizer takes no PNGs"),
        "{}",
        sizer[0].error
    );
    assert_eq!(sizer[0].source.key.as_deref(), Some(refused.id.as_str()));
    tp.stop().await
}
