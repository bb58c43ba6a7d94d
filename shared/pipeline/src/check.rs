//! Reading and checking a pipeline file. Every problem found is reported at once, each with the
//! file, the line and the column, and nothing is started from a file that has one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use crate::decl::{At, Pipeline, StageDecl};

/// Consumer properties a stage may not set: the runtime stores offsets itself once outputs are
/// acknowledged, names the group after the stage, and runs its membership.
pub const RESERVED_CONSUMER_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "group.instance.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
];

/// One thing wrong in a pipeline file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub at: At,
    pub message: String,
}

impl Problem {
    pub fn at(at: At, message: impl Into<String>) -> Self {
        Self {
            at,
            message: message.into(),
        }
    }
}

/// Why a pipeline file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot read pipeline file {file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render(file, problems))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
}

impl PipelineError {
    /// The problems found, in file order (none for a file that could not be read).
    pub fn problems(&self) -> &[Problem] {
        match self {
            PipelineError::Read { .. } => &[],
            PipelineError::Invalid { problems, .. } => problems,
        }
    }
}

fn render(file: &str, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{file}:{}:{}: {}", p.at.line, p.at.column, p.message))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The stage kinds a platform knows, and what each asks of a stage's settings and ports.
pub trait KindCatalog {
    /// Every kind name, for messages.
    fn kinds(&self) -> Vec<String>;

    /// Checks a stage of kind `stage.kind`: its config and its ports. None if the kind is
    /// unknown.
    fn check(&self, stage: &StageDecl) -> Option<Vec<Problem>>;
}

/// Reads and checks the pipeline file at `path`.
pub fn load(path: &Path, kinds: &dyn KindCatalog) -> Result<Pipeline, PipelineError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PipelineError::Read {
        file: file.clone(),
        source,
    })?;
    parse(&text, &file, kinds)
}

/// Parses and checks pipeline `text`, read from `file` (named in problems).
pub fn parse(text: &str, file: &str, kinds: &dyn KindCatalog) -> Result<Pipeline, PipelineError> {
    let invalid = |problems: Vec<Problem>| PipelineError::Invalid {
        file: file.to_owned(),
        problems,
    };
    let pipeline: Pipeline = serde_saphyr::from_str(text).map_err(|e| {
        let at = e.location().map(At::from_location).unwrap_or_default();
        invalid(vec![Problem::at(at, first_line(&e.to_string()))])
    })?;
    let mut problems = check(&pipeline, kinds);
    if problems.is_empty() {
        Ok(pipeline)
    } else {
        problems.sort_by_key(|p| p.at);
        Err(invalid(problems))
    }
}

/// The message of a rendered YAML error, without its location prefix and source snippet.
fn first_line(rendered: &str) -> String {
    let line = rendered.lines().next().unwrap_or(rendered).trim();
    // serde-saphyr writes "error: line L column C: message" or just the message.
    match line.split_once(": ") {
        Some((head, rest)) if head.contains("line") || head == "error" => {
            first_line_rest(rest).to_owned()
        }
        _ => line.to_owned(),
    }
}

fn first_line_rest(rest: &str) -> &str {
    match rest.split_once(": ") {
        Some((head, tail)) if head.contains("line") && head.contains("column") => tail,
        _ => rest,
    }
}

/// Topic and stage names: what Kafka allows in a topic name, lower case.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
}

/// Records the declaration of a topic or stage (`what`) named `name`: its name must be valid
/// and not taken.
fn declare<'a>(
    what: &str,
    name: &'a serde_saphyr::Spanned<String>,
    seen: &mut HashMap<&'a str, At>,
    problems: &mut Vec<Problem>,
) {
    let at = At::of(name);
    let name = name.value.as_str();
    if !valid_name(name) {
        problems.push(Problem::at(at, format!("{what} name `{name}` is not valid: use lower-case letters, digits, `.`, `-` and `_`, starting with a letter or digit")));
    }
    if let Some(first) = seen.insert(name, at) {
        problems.push(Problem::at(
            at,
            format!(
                "{what} `{name}` is declared twice (first on line {})",
                first.line
            ),
        ));
    }
}

/// Every problem of a parsed pipeline.
pub fn check(p: &Pipeline, kinds: &dyn KindCatalog) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut topics: HashMap<&str, At> = HashMap::new();
    for t in &p.topics {
        let name = t.name.value.as_str();
        declare("topic", &t.name, &mut topics, &mut problems);
        if let Some(n) = &t.partitions
            && n.value < 1
        {
            problems.push(Problem::at(
                At::of(n),
                format!("topic `{name}` needs at least one partition"),
            ));
        }
        if let Some(r) = &t.retention
            && parse_duration_ms(&r.value).is_none()
        {
            problems.push(Problem::at(At::of(r), format!("retention `{}` is not a duration: write a number with `d`, `h`, `m`, `s` or `ms`", r.value)));
        }
    }

    // Who writes each topic.
    let mut writers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for s in &p.stages {
        for topic in s.outputs.values() {
            writers
                .entry(topic.value.as_str())
                .or_default()
                .push(&s.name.value);
        }
    }
    let external: BTreeSet<&str> = p
        .topics
        .iter()
        .filter(|t| t.produced_by.is_some())
        .map(|t| t.name.value.as_str())
        .collect();

    let mut stages: HashMap<&str, At> = HashMap::new();
    for s in &p.stages {
        let name = s.name.value.as_str();
        declare("stage", &s.name, &mut stages, &mut problems);
        if s.version.value == 0 {
            problems.push(Problem::at(
                At::of(&s.version),
                format!("stage `{name}`: versions start at 1"),
            ));
        }
        if let Some(c) = &s.concurrency
            && c.value == 0
        {
            problems.push(Problem::at(
                At::of(c),
                format!("stage `{name}`: concurrency must be at least 1"),
            ));
        }
        for (property, value) in &s.consumer {
            if RESERVED_CONSUMER_PROPERTIES.contains(&property.as_str()) {
                problems.push(Problem::at(
                    At::of(value),
                    format!("stage `{name}`: consumer property `{property}` is the platform's own (its group, offsets and membership), not the stage's to set"),
                ));
            }
        }
        if s.inputs.value.is_empty() {
            problems.push(Problem::at(
                At::of(&s.inputs),
                format!("stage `{name}` reads no topic"),
            ));
        }
        for input in &s.inputs.value {
            let topic = input.value.as_str();
            if !topics.contains_key(topic) {
                problems.push(Problem::at(
                    At::of(input),
                    format!("stage `{name}` reads `{topic}`, which is not a declared topic"),
                ));
            } else if !writers.contains_key(topic) && !external.contains(topic) {
                problems.push(Problem::at(At::of(input), format!("stage `{name}` reads `{topic}`, which nothing produces: no stage writes it and its declaration names no `produced_by`")));
            }
        }
        for (port, topic) in &s.outputs {
            if !topics.contains_key(topic.value.as_str()) {
                problems.push(Problem::at(
                    At::of(topic),
                    format!(
                        "stage `{name}`: port `{port}` is bound to `{}`, which is not a declared topic",
                        topic.value
                    ),
                ));
            }
        }
        match kinds.check(s) {
            Some(found) => problems.extend(found),
            None => problems.push(Problem::at(
                At::of(&s.kind),
                format!(
                    "stage `{name}`: unknown stage kind `{}`; kinds: {}",
                    s.kind.value,
                    kinds.kinds().join(", ")
                ),
            )),
        }
    }
    problems.extend(unbounded_cycles(p));
    problems
}

/// Cycles of stages (a stage writes a topic that leads back to it) where no stage has
/// `max_passes`: an event could go round for ever.
fn unbounded_cycles(p: &Pipeline) -> Vec<Problem> {
    let index: HashMap<&str, usize> = p
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.value.as_str(), i))
        .collect();
    let readers = |topic: &str| -> Vec<usize> {
        p.stages
            .iter()
            .filter(|s| s.input_names().any(|i| i == topic))
            .filter_map(|s| index.get(s.name.value.as_str()).copied())
            .collect()
    };
    let next: Vec<Vec<usize>> = p
        .stages
        .iter()
        .map(|s| {
            let mut n: Vec<usize> = s.outputs.values().flat_map(|t| readers(&t.value)).collect();
            n.sort_unstable();
            n.dedup();
            n
        })
        .collect();
    // Depth-first search; a back edge closes a cycle made of the stages on the path.
    let mut state = vec![0u8; p.stages.len()]; // 0 new, 1 on path, 2 done
    let mut path = Vec::new();
    let mut cycles: Vec<Vec<usize>> = Vec::new();
    fn visit(
        v: usize,
        next: &[Vec<usize>],
        state: &mut [u8],
        path: &mut Vec<usize>,
        cycles: &mut Vec<Vec<usize>>,
    ) {
        state[v] = 1;
        path.push(v);
        for &w in &next[v] {
            match state[w] {
                0 => visit(w, next, state, path, cycles),
                1 => {
                    let from = path.iter().position(|&x| x == w).unwrap_or(0);
                    cycles.push(path[from..].to_vec());
                }
                _ => {}
            }
        }
        path.pop();
        state[v] = 2;
    }
    for v in 0..p.stages.len() {
        if state[v] == 0 {
            visit(v, &next, &mut state, &mut path, &mut cycles);
        }
    }
    cycles
        .into_iter()
        .filter(|c| c.iter().all(|&i| p.stages[i].max_passes.is_none()))
        .map(|c| {
            let first = &p.stages[c[0]];
            let mut names: Vec<&str> = c.iter().map(|&i| p.stages[i].name.value.as_str()).collect();
            names.push(&first.name.value);
            Problem::at(
                At::of(&first.name),
                format!(
                    "stages {} form a cycle without a bound: give one of them `max_passes`",
                    names.join(" -> ")
                ),
            )
        })
        .collect()
}

/// `7d`, `12h`, `30m`, `45s`, `500ms` in milliseconds.
pub fn parse_duration_ms(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let scale = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("7d"), Some(7 * 86_400_000));
        assert_eq!(parse_duration_ms("500ms"), Some(500));
        assert_eq!(parse_duration_ms("12h"), Some(12 * 3_600_000));
        assert_eq!(parse_duration_ms("12"), None);
        assert_eq!(parse_duration_ms("1w"), None);
        assert_eq!(parse_duration_ms("h"), None);
    }

    #[test]
    fn names() {
        assert!(valid_name("jobs.image"));
        assert!(valid_name("shard-3"));
        assert!(!valid_name("Jobs"));
        assert!(!valid_name(".hidden"));
        assert!(!valid_name("a b"));
        assert!(!valid_name(""));
    }
}
