//! Running a worker command the book's way (ch. 10): no shell, its own process group, a time
//! limit, stderr kept for the error, the exit status mapped to a stage result; and reading what
//! it left in its output folder. Used by exec stages and by `exec` steps of a chain.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use mediaflow_runtime::StageError;
use tokio::io::AsyncReadExt;

/// Exit status for "try again later" (sysexits `EX_TEMPFAIL`).
pub const EXIT_TRANSIENT: i32 = 75;
/// Exit status for "this input is unusable" (sysexits `EX_DATAERR`).
pub const EXIT_BAD_INPUT: i32 = 65;

/// A job's process group: every process in it is killed when this is dropped, so nothing a
/// command started outlives its job.
struct ProcessGroup(rustix::process::Pid);

impl ProcessGroup {
    fn of(leader: u32) -> Option<Self> {
        rustix::process::Pid::from_raw(i32::try_from(leader).ok()?).map(Self)
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // Fails with ESRCH when the group is already gone: nothing left to stop.
        let _ = rustix::process::kill_process_group(self.0, rustix::process::Signal::KILL);
    }
}

/// Local disk trouble (full, permissions) is not the item's fault and may pass.
pub fn io_error(what: &str, e: std::io::Error) -> StageError {
    StageError::transient(format!("{what}: {e}"))
}

/// Runs `argv` in `dir` with `env` added, for at most `timeout`; exit 0 is success, 75 a
/// transient failure, 65 bad input, anything else (a signal, the timeout) a permanent failure
/// that quotes the end of its stderr.
pub async fn run(
    argv: &[String],
    dir: &Path,
    env: &[(&str, &OsStr)],
    timeout: Duration,
) -> Result<(), StageError> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| StageError::permanent("the command is empty"))?;
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied());
    // The command runs in a process group of its own, so whatever it starts ends with it.
    let mut child = command
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| StageError::permanent(format!("cannot run `{program}`: {e}")))?;
    // Kills the whole group when the job ends, times out or is abandoned (drain deadline).
    let group = child.id().and_then(ProcessGroup::of);
    let mut pipe = child.stderr.take().expect("stderr is piped");
    // Read all of stderr (so the child never blocks on a full pipe), keep the end.
    let reading = tokio::spawn(async move {
        let mut text = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n @ 1..) = pipe.read(&mut buf).await {
            text.extend_from_slice(&buf[..n]);
            if text.len() > 16 * 1024 {
                text.drain(..text.len() - 4 * 1024);
            }
        }
        text
    });
    let waited = tokio::time::timeout(timeout, child.wait()).await;
    // The command is over: what it left running in the background goes too (and with it the
    // last holders of its stderr).
    drop(group);
    let stderr = reading.await.unwrap_or_default();
    let status = match waited {
        Ok(status) => {
            status.map_err(|e| StageError::permanent(format!("waiting for `{program}`: {e}")))?
        }
        Err(_) => {
            return Err(StageError::permanent(format!(
                "`{program}` did not finish within {} s and was killed",
                timeout.as_secs()
            )));
        }
    };
    let tail = String::from_utf8_lossy(&stderr[stderr.len().saturating_sub(1024)..])
        .trim()
        .to_owned();
    let said = if tail.is_empty() {
        String::new()
    } else {
        format!(": {tail}")
    };
    match status.code() {
        Some(0) => Ok(()),
        Some(EXIT_TRANSIENT) => Err(StageError::transient(format!(
            "`{program}` exited {EXIT_TRANSIENT} (try again){said}"
        ))),
        Some(EXIT_BAD_INPUT) => Err(StageError::bad_input(format!(
            "`{program}` exited {EXIT_BAD_INPUT} (bad input){said}"
        ))),
        Some(code) => Err(StageError::permanent(format!(
            "`{program}` exited {code}{said}"
        ))),
        None => Err(StageError::permanent(format!(
            "`{program}` was killed by a signal ({status}){said}"
        ))),
    }
}

/// One file a command left in its output folder.
#[derive(Debug)]
pub struct OutputFile {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
}

/// The regular files a command left in `out`, sorted by name, within `max_files` and
/// `max_bytes` in all; `skip` names files that are not outputs (a step's `result.json`).
/// Symlinks and folders are not followed; a name other than letters, digits, `.`, `_`, `-` (or
/// starting with `.`) is refused.
pub async fn output_files(
    out: &Path,
    max_files: usize,
    max_bytes: u64,
    skip: &[&str],
) -> Result<Vec<OutputFile>, StageError> {
    let reading = |e| io_error("reading the output folder", e);
    let mut entries = tokio::fs::read_dir(out).await.map_err(reading)?;
    let mut files = Vec::new();
    let mut total = 0;
    while let Some(entry) = entries.next_entry().await.map_err(reading)? {
        let meta = tokio::fs::symlink_metadata(entry.path())
            .await
            .map_err(|e| io_error("reading an output", e))?;
        if !meta.is_file() {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            return Err(StageError::permanent("an output file name is not UTF-8"));
        };
        if skip.contains(&name.as_str()) {
            continue;
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            || name.starts_with('.')
        {
            return Err(StageError::permanent(format!(
                "output file name `{name}` is not allowed (letters, digits, `.`, `_`, `-`)"
            )));
        }
        total += meta.len();
        files.push(OutputFile {
            name,
            path: entry.path(),
            size: meta.len(),
        });
    }
    if files.len() > max_files || total > max_bytes {
        return Err(StageError::permanent(format!(
            "the command wrote {} files, {total} bytes; limits: {max_files} files, {max_bytes} bytes",
            files.len(),
        )));
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// The content type an output is stored with, from its extension.
pub fn content_type_of(name: &str) -> &'static str {
    match name
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
        .as_deref()
    {
        Some("json") => "application/json",
        Some("txt" | "log") => "text/plain",
        Some("vtt") => "text/vtt",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("mp4") => "video/mp4",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_follow_the_extension() {
        assert_eq!(content_type_of("A.JPG"), "image/jpeg");
        assert_eq!(content_type_of("noext"), "application/octet-stream");
    }

    #[tokio::test]
    async fn exits_map_to_results_and_outputs_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let sh = |script: &str| vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()];
        let at = Duration::from_secs(10);
        let out = dir.path().as_os_str();
        run(
            &sh(
                "echo hi > \"$OUT/b.txt\"; echo x > \"$OUT/a.json\"; echo r > \"$OUT/result.json\"",
            ),
            dir.path(),
            &[("OUT", out)],
            at,
        )
        .await
        .unwrap();
        let files = output_files(dir.path(), 10, 1000, &["result.json"])
            .await
            .unwrap();
        let names: Vec<_> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a.json", "b.txt"]);
        assert!(output_files(dir.path(), 1, 1000, &[]).await.is_err());
        let e = run(&sh("echo nope >&2; exit 65"), dir.path(), &[], at)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("bad input") && e.to_string().contains("nope"),
            "{e}"
        );
        let e = run(&sh("sleep 5"), dir.path(), &[], Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("did not finish"), "{e}");
    }
}
