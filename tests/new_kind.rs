//! A stage kind of one's own, as README's "Writing a stage kind" shows: `Shout` below is the whole
//! kind (settings, check, handler; under 60 lines), added with `Registry::with` and declared in a
//! pipeline file like any shipped kind.

mod support;

use anyhow::{Result, ensure};
use cloudevents::{AttributesReader, Event};
use mediaflow::{BuildContext, Built, Kind, Registry, StageSpec};
use mediaflow_pipeline::kinds::{ports, settings};
use mediaflow_pipeline::{Problem, StageDecl};
use mediaflow_runtime::{Handler, Output, StageError};
use support::{Backend, TestPlatform};

// ---- the kind: upper-cases `data.text` and adds a suffix, on port `out` ----

#[derive(Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ShoutConfig {
    #[serde(default)]
    suffix: String,
}

struct Shout;

impl Kind for Shout {
    fn name(&self) -> &str {
        "shout"
    }

    fn check(&self, stage: &StageDecl) -> Vec<Problem> {
        let bad_settings = settings::<ShoutConfig>(stage).err();
        bad_settings
            .into_iter()
            .chain(ports(stage, &["out".to_owned()], false))
            .collect()
    }

    fn build(&self, stage: &StageSpec, _: &BuildContext<'_>) -> Result<Built> {
        Ok(Built::handler(Shouter(stage.settings::<ShoutConfig>()?)))
    }
}

struct Shouter(ShoutConfig);

impl Handler for Shouter {
    async fn handle(&self, event: &Event) -> Result<Vec<Output>, StageError> {
        let data =
            mediaflow_events::data_json(event).map_err(|e| StageError::bad_input(e.to_string()))?;
        let Some(text) = data["text"].as_str() else {
            return Err(StageError::bad_input("no `text` in the event"));
        };
        let loud = format!("{}{}", text.to_uppercase(), self.0.suffix);
        let subject = event.subject().unwrap_or(event.id());
        Ok(vec![Output::json(
            "out",
            "example.shouted",
            subject,
            serde_json::json!({ "text": loud }),
        )?])
    }
}

// ---- the kind at work ----

const PIPELINE: &str = r#"
topics:
  - {name: said, produced_by: test}
  - {name: shouted}
stages:
  - name: shout
    kind: shout
    inputs: [said]
    outputs: {out: shouted}
    config: {suffix: "!"}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_kind_of_ones_own_runs_from_a_pipeline_file() -> Result<()> {
    let files = tempfile::tempdir()?;
    let path = files.path().join("pipeline.yaml");
    std::fs::write(&path, PIPELINE)?;
    // The shipped registry refuses the file: the kind is unknown to it.
    let unknown = mediaflow_pipeline::parse(PIPELINE, "p.yaml", &Registry::default()).unwrap_err();
    ensure!(unknown.to_string().contains("shout"), "{unknown}");
    let wrong = PIPELINE.replace("suffix", "sufix");
    let refused =
        mediaflow_pipeline::parse(&wrong, "p.yaml", &Registry::default().with(Shout)).unwrap_err();
    ensure!(
        refused.to_string().contains("unknown field `sufix`"),
        "{refused}"
    );

    let registry = Registry::default().with(Shout);
    let tp = TestPlatform::start_registry(Backend::Sqlite, registry, |c| {
        c.pipeline = Some(path.into())
    })
    .await?;
    let said: Vec<_> = ["hello", "quiet please"]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            (
                format!("s{i}"),
                format!("k{i}"),
                serde_json::json!({ "text": t }),
            )
        })
        .collect();
    tp.publish_json("said", "example.said", &said).await?;
    tp.wait_caught_up("shout", "said").await?;
    let shouted = tp.events("shouted").await?;
    let mut texts: Vec<String> = shouted
        .iter()
        .map(|e| {
            mediaflow_events::data_json(e).unwrap()["text"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    texts.sort();
    ensure!(texts == ["HELLO!", "QUIET PLEASE!"], "{texts:?}");
    for e in &shouted {
        ensure!(e.ty() == "example.shouted" && *e.source() == "/mediaflow/shout");
        ensure!(
            e.id() != "s0" && e.id() != "s1",
            "a new event gets an id of its own"
        );
    }
    tp.stop().await
}
