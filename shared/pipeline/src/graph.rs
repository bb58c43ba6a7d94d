//! The topology of a pipeline drawn for people: plain text, Graphviz DOT or Mermaid. Topics and
//! stages are nodes; a stage reads its input topics and writes each output port to a topic.

use crate::decl::Pipeline;

/// One line per stage: `name (kind vN): inputs -> port: topic, ...`.
pub fn text(p: &Pipeline) -> String {
    let mut out = String::new();
    for t in &p.topics {
        if let Some(by) = &t.produced_by {
            out.push_str(&format!("{by} -> {}\n", t.name.value));
        }
    }
    for s in &p.stages {
        let inputs: Vec<&str> = s.input_names().collect();
        let outputs: Vec<String> = s
            .outputs
            .iter()
            .map(|(port, t)| format!("{port}: {}", t.value))
            .collect();
        out.push_str(&format!(
            "{} ({} v{}): {} -> {}\n",
            s.name.value,
            s.kind.value,
            s.version.value,
            inputs.join(", "),
            if outputs.is_empty() {
                "(no outputs)".to_owned()
            } else {
                outputs.join(", ")
            }
        ));
    }
    out
}

fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A Graphviz digraph: topics as ellipses, stages as boxes, edges labelled with ports.
pub fn dot(p: &Pipeline) -> String {
    let mut out = String::from("digraph pipeline {\n  rankdir=LR;\n");
    for t in &p.topics {
        out.push_str(&format!(
            "  {} [shape=ellipse];\n",
            quoted(&format!("topic:{}", t.name.value))
        ));
        out.push_str(&format!(
            "  {} [label={}];\n",
            quoted(&format!("topic:{}", t.name.value)),
            quoted(&t.name.value)
        ));
        if let Some(by) = &t.produced_by {
            out.push_str(&format!(
                "  {} [shape=plaintext];\n  {} -> {};\n",
                quoted(&format!("external:{by}")),
                quoted(&format!("external:{by}")),
                quoted(&format!("topic:{}", t.name.value))
            ));
        }
    }
    for s in &p.stages {
        let node = quoted(&format!("stage:{}", s.name.value));
        out.push_str(&format!(
            "  {node} [shape=box, label={}];\n",
            quoted(&format!("{}\\n{}", s.name.value, s.kind.value))
        ));
        for input in s.input_names() {
            out.push_str(&format!(
                "  {} -> {node};\n",
                quoted(&format!("topic:{input}"))
            ));
        }
        for (port, topic) in &s.outputs {
            out.push_str(&format!(
                "  {node} -> {} [label={}];\n",
                quoted(&format!("topic:{}", topic.value)),
                quoted(port)
            ));
        }
    }
    out.push_str("}\n");
    out
}

/// Mermaid ids allow letters, digits and `_` only.
fn mermaid_id(prefix: &str, name: &str) -> String {
    let body: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{prefix}_{body}")
}

/// A Mermaid flowchart: topics as rounded nodes, stages as boxes.
pub fn mermaid(p: &Pipeline) -> String {
    let mut out = String::from("flowchart LR\n");
    for t in &p.topics {
        out.push_str(&format!(
            "  {}([\"{}\"])\n",
            mermaid_id("t", &t.name.value),
            t.name.value
        ));
        if let Some(by) = &t.produced_by {
            out.push_str(&format!(
                "  {}>\"{by}\"] --> {}\n",
                mermaid_id("x", by),
                mermaid_id("t", &t.name.value)
            ));
        }
    }
    for s in &p.stages {
        let id = mermaid_id("s", &s.name.value);
        out.push_str(&format!(
            "  {id}[\"{} ({})\"]\n",
            s.name.value, s.kind.value
        ));
        for input in s.input_names() {
            out.push_str(&format!("  {} --> {id}\n", mermaid_id("t", input)));
        }
        for (port, topic) in &s.outputs {
            out.push_str(&format!(
                "  {id} -- \"{port}\" --> {}\n",
                mermaid_id("t", &topic.value)
            ));
        }
    }
    out
}
