//! Pipeline files through the public API: the shipped default pipeline is valid and draws as
//! expected; each malformed file in `tests/malformed/` is refused with the file, the line and
//! the problem.

use std::path::{Path, PathBuf};

use mediaflow_pipeline::kinds::{Catalogs, LinkingKinds};
use mediaflow_pipeline::{KindCatalog, PipelineError, Problem, StageDecl, graph, load};

/// The media stage kinds as the platform declares them: one port, `out`.
struct MediaKinds;

impl KindCatalog for MediaKinds {
    fn kinds(&self) -> Vec<String> {
        vec!["image".into(), "video".into()]
    }

    fn check(&self, stage: &StageDecl) -> Option<Vec<Problem>> {
        matches!(stage.kind.value.as_str(), "image" | "video").then(|| {
            stage
                .outputs
                .keys()
                .filter(|p| *p != "out")
                .map(|p| {
                    Problem::at(
                        mediaflow_pipeline::At::of(&stage.kind),
                        format!("no port `{p}`"),
                    )
                })
                .collect()
        })
    }
}

fn catalog() -> Catalogs<'static> {
    Catalogs(vec![&LinkingKinds, &MediaKinds])
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn the_default_pipeline_is_valid_and_draws() {
    let p = load(&root().join("pipelines/default.yaml"), &catalog()).unwrap();
    assert_eq!(p.stages.len(), 3);
    let text = graph::text(&p);
    assert!(text.contains("gateway -> media.uploaded"), "{text}");
    assert!(
        text.contains(
            "router (splitter v1): media.uploaded -> image: jobs.image, video: jobs.video"
        ),
        "{text}"
    );
    assert!(
        text.contains("image-worker (image v2): jobs.image -> out: images.processed"),
        "{text}"
    );
    let dot = graph::dot(&p);
    assert!(dot.starts_with("digraph pipeline {"), "{dot}");
    assert!(
        dot.contains("\"stage:router\" -> \"topic:jobs.image\" [label=\"image\"]"),
        "{dot}"
    );
    let mermaid = graph::mermaid(&p);
    assert!(
        mermaid.contains("s_router -- \"video\" --> t_jobs_video"),
        "{mermaid}"
    );
}

/// (file, line, what the message says)
const MALFORMED: &[(&str, u64, &str)] = &[
    ("01-yaml-syntax.yaml", 4, "unclosed quote"),
    ("02-unknown-field.yaml", 8, "ouputs"),
    (
        "03-unknown-kind.yaml",
        7,
        "unknown stage kind `teleporter`; kinds: copier, filter, splitter, sharder, merger, image, video",
    ),
    (
        "04-port-bound-to-nothing.yaml",
        7,
        "port `video` is bound to nothing",
    ),
    (
        "05-undeclared-output.yaml",
        9,
        "port `a` is bound to `somewhere.else`, which is not a declared topic",
    ),
    (
        "06-input-nobody-produces.yaml",
        7,
        "reads `orphan`, which nothing produces",
    ),
    (
        "07-cycle-without-bound.yaml",
        7,
        "stages m -> back -> m form a cycle without a bound",
    ),
    (
        "08-duplicate-stage.yaml",
        11,
        "stage `same` is declared twice (first on line 6)",
    ),
    (
        "09-bad-expression.yaml",
        12,
        "predicate: bad expression `data.size >`",
    ),
    (
        "10-duplicate-topic.yaml",
        4,
        "topic `in` is declared twice (first on line 2)",
    ),
    (
        "11-sharder-without-shards.yaml",
        7,
        "port `shard-1` is bound to nothing",
    ),
    (
        "12-bad-retention.yaml",
        4,
        "retention `2 weeks` is not a duration",
    ),
    (
        "13-merger-with-one-input.yaml",
        8,
        "a merger reads two or more topics",
    ),
    (
        "14-bad-names.yaml",
        2,
        "topic name `Media Uploaded` is not valid",
    ),
    ("15-kind-settings.yaml", 12, "unknown field `predicat`"),
    (
        "16-zero-concurrency.yaml",
        8,
        "concurrency must be at least 1",
    ),
    (
        "17-reserved-consumer-property.yaml",
        13,
        "consumer property `enable.auto.commit` is the platform's own",
    ),
];

#[test]
fn malformed_files_are_refused_with_the_line_and_the_problem() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/malformed");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let listed: Vec<String> = MALFORMED.iter().map(|(f, _, _)| (*f).to_owned()).collect();
    assert_eq!(files, listed, "every malformed file has its expectation");
    let mut wrong = Vec::new();
    for (file, line, says) in MALFORMED {
        let path = dir.join(file);
        let err = match load(&path, &catalog()) {
            Ok(_) => panic!("{file} was accepted"),
            Err(e) => e,
        };
        let PipelineError::Invalid { .. } = &err else {
            panic!("{file}: {err}");
        };
        let shown = err.to_string();
        eprintln!("{shown}");
        let hit = err
            .problems()
            .iter()
            .find(|p| p.at.line == *line && p.message.contains(says));
        // The rendering names the file and the line.
        if hit.is_none() || !shown.contains(&format!("{}:{line}:", path.display())) {
            wrong.push(format!(
                "{file}: expected line {line} saying {says:?}, got:\n{shown}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
