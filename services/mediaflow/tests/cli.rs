//! The `mediaflow` binary as users run it: `up --samples --exit-after-samples` (README command
//! one), SIGTERM draining, and configuration errors.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    let dir = std::env::var_os("MEDIAFLOW_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/mediaflow/fixtures")
        });
    assert!(
        dir.join("rocket.jpg").is_file(),
        "fixtures missing in {}: run `./x test`",
        dir.display()
    );
    dir
}

/// A `mediaflow` command on its own data folder and free ports.
fn mediaflow(data: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mediaflow"));
    cmd.env("MEDIAFLOW__DATA_DIR", data)
        .env("MEDIAFLOW__EMBEDDED__KAFKA_PORT", "0")
        .env("MEDIAFLOW__EMBEDDED__S3_PORT", "0")
        .env("MEDIAFLOW__EMBEDDED__SMTP_PORT", "0")
        .env("MEDIAFLOW__GATEWAY__LISTEN", "127.0.0.1:0")
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn");
    cmd
}

#[test]
fn up_processes_the_samples_and_exits() {
    let tmp = tempfile::tempdir().unwrap();
    let samples = tmp.path().join("samples");
    std::fs::create_dir(&samples).unwrap();
    for name in ["rocket.jpg", "chelsea.png"] {
        std::fs::copy(fixtures().join(name), samples.join(name)).unwrap();
    }
    let out = mediaflow(&tmp.path().join("data"))
        .args(["up", "--samples"])
        .arg(&samples)
        .arg("--exit-after-samples")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["rocket.jpg", "chelsea.png"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name}: thumb-256 256x")));
        assert!(
            line.is_some(),
            "no thumbnail reported for {name}:\n{stdout}"
        );
    }
    assert!(stdout.matches("/v1/media/").count() >= 2, "{stdout}");
    assert!(stdout.contains("s3://mediaflow/derived/"), "{stdout}");
    // The photos again as a batch, through the tagging pipeline, to its report.
    assert!(
        stdout.contains("(samples): 2 of 2 items uploaded, state complete")
            && stdout.contains("report (2 items):")
            && stdout.contains("objects"),
        "{stdout}"
    );
}

#[test]
fn sigterm_exits_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = mediaflow(&tmp.path().join("data"))
        .arg("up")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let serving = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("serving until Ctrl-C"));
    assert!(serving, "mediaflow up never reported serving");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "mediaflow did not exit after SIGTERM"
        );
        std::thread::park_timeout(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit after SIGTERM: {exit}");
}

#[test]
fn bad_configuration_is_reported_with_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("mediaflow.toml");
    std::fs::write(&file, "[gateway]\nmax_upload_bytes = \"lots\"\n").unwrap();
    let out = mediaflow(tmp.path())
        .args(["--config"])
        .arg(&file)
        .arg("config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_upload_bytes"), "{stderr}");

    let out = mediaflow(tmp.path())
        .env("MEDIAFLOW__GATEWAY__MAX_UPLOAD_BYTES", "1000")
        .arg("config")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("max_upload_bytes = 1000"));
}

/// The repository's root, where `pipelines/` is.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn pipeline_check_accepts_the_shipped_pipeline_and_draws_it() {
    let tmp = tempfile::tempdir().unwrap();
    let file = root().join("pipelines/default.yaml");
    let out = mediaflow(tmp.path())
        .args(["pipeline", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 stage(s), no problems"));
    let out = mediaflow(tmp.path())
        .args(["pipeline", "graph", "--format", "dot"])
        .arg(&file)
        .output()
        .unwrap();
    let dot = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        dot.contains("\"stage:router\" -> \"topic:jobs.video\" [label=\"video\"]"),
        "{dot}"
    );
}

#[test]
fn pipeline_check_names_the_file_the_line_and_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("p.yaml");
    std::fs::write(
        &file,
        "topics:\n  - name: in\n    produced_by: gateway\n  - name: out\nstages:\n  - name: s\n    kind: copier\n    inputs: [in, missing]\n    outputs:\n      a: out\n",
    )
    .unwrap();
    let out = mediaflow(tmp.path())
        .args(["pipeline", "check"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:8:18: stage `s` reads `missing`, which is not a declared topic",
            file.display()
        )),
        "{stderr}"
    );
}
