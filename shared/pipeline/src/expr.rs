//! Expressions in pipeline files (predicates of filters and splitters, keys of sharders) are CEL,
//! the Common Expression Language, through the `cel` crate; never a parser of our own. An
//! expression sees the event's attributes `id`, `type`, `source`, `subject` (an empty string when
//! it has none) and its JSON payload as `data`.

use std::collections::HashMap;
use std::sync::Arc;

/// What an expression sees of an event.
#[derive(Clone, Copy, Debug)]
pub struct EventView<'a> {
    pub id: &'a str,
    pub ty: &'a str,
    pub source: &'a str,
    pub subject: Option<&'a str>,
    pub data: &'a serde_json::Value,
}

/// A compiled expression and its source.
pub struct Expr {
    source: String,
    program: cel::Program,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Expr").field(&self.source).finish()
    }
}

impl Expr {
    /// Compiles `source`; the error says what is wrong with it.
    pub fn compile(source: &str) -> Result<Self, String> {
        if source.trim().is_empty() {
            return Err("the expression is empty".into());
        }
        let program = cel::Program::compile(source).map_err(|e| {
            // The first line says what is wrong; the rest draws the expression again.
            let why = e.to_string();
            let why = why.lines().next().unwrap_or_default().trim().to_owned();
            let why = why
                .strip_prefix("ERROR: <input>:")
                .unwrap_or(&why)
                .to_owned();
            format!("bad expression `{source}`: {why}")
        })?;
        Ok(Self {
            source: source.to_owned(),
            program,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn program(&self) -> &cel::Program {
        &self.program
    }

    /// The expression's value for `event`; the error says what went wrong (a missing field, a
    /// type mismatch).
    pub fn eval(&self, event: &EventView<'_>) -> Result<cel::Value, String> {
        let mut context = cel::Context::default();
        context.add_variable_from_value("id", event.id.to_owned());
        context.add_variable_from_value("type", event.ty.to_owned());
        context.add_variable_from_value("source", event.source.to_owned());
        context.add_variable_from_value("subject", event.subject.unwrap_or_default().to_owned());
        context.add_variable_from_value("data", json_to_cel(event.data));
        self.program
            .execute(&context)
            .map_err(|e| format!("`{}`: {e}", self.source))
    }

    /// Whether a predicate holds for `event`; a value that is not a boolean is an error.
    pub fn holds(&self, event: &EventView<'_>) -> Result<bool, String> {
        match self.eval(event)? {
            cel::Value::Bool(b) => Ok(b),
            other => Err(format!(
                "`{}` is a predicate but gave {other:?}, not true or false",
                self.source
            )),
        }
    }

    /// A key for `event`: a string, or a number or boolean written out; anything else is an
    /// error.
    pub fn key(&self, event: &EventView<'_>) -> Result<String, String> {
        match self.eval(event)? {
            cel::Value::String(s) => Ok(s.as_ref().clone()),
            cel::Value::Int(i) => Ok(i.to_string()),
            cel::Value::UInt(u) => Ok(u.to_string()),
            cel::Value::Bool(b) => Ok(b.to_string()),
            other => Err(format!(
                "`{}` is a key but gave {other:?}, not a string or number",
                self.source
            )),
        }
    }
}

/// JSON as CEL sees it. Whole numbers are CEL `int`s (so `data.size < 1000` compares ints, as a
/// reader of the file expects), others `double`s.
fn json_to_cel(v: &serde_json::Value) -> cel::Value {
    use serde_json::Value as J;
    match v {
        J::Null => cel::Value::Null,
        J::Bool(b) => cel::Value::Bool(*b),
        J::Number(n) => n.as_i64().map_or_else(
            || {
                n.as_u64().map_or_else(
                    || cel::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
                    cel::Value::UInt,
                )
            },
            cel::Value::Int,
        ),
        J::String(s) => cel::Value::String(Arc::new(s.clone())),
        J::Array(items) => cel::Value::List(Arc::new(items.iter().map(json_to_cel).collect())),
        J::Object(map) => {
            let map: HashMap<String, cel::Value> = map
                .iter()
                .map(|(k, v)| (k.clone(), json_to_cel(v)))
                .collect();
            cel::Value::from(map)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_cel_and_explains_what_is_not() {
        assert!(Expr::compile("data.kind == 'image' && data.object.size < 1000").is_ok());
        let err = Expr::compile("data.kind == ").unwrap_err();
        assert!(err.starts_with("bad expression `data.kind == `"), "{err}");
        assert!(Expr::compile("  ").is_err());
    }

    fn view(data: &serde_json::Value) -> EventView<'_> {
        EventView {
            id: "e1",
            ty: "mediaflow.media.uploaded",
            source: "/gateway",
            subject: Some("m1"),
            data,
        }
    }

    #[test]
    fn predicates_and_keys_read_attributes_and_data() {
        let data =
            serde_json::json!({"kind": "image", "object": {"size": 512}, "tags": ["a"], "r": 0.5});
        let e = view(&data);
        let holds = |s: &str| Expr::compile(s).unwrap().holds(&e);
        assert_eq!(
            holds("data.kind == 'image' && data.object.size < 1000"),
            Ok(true)
        );
        assert_eq!(
            holds("type == 'mediaflow.media.uploaded' && subject == 'm1'"),
            Ok(true)
        );
        assert_eq!(holds("'a' in data.tags && data.r > 0.25"), Ok(true));
        assert_eq!(holds("has(data.user)"), Ok(false));
        assert!(
            holds("data.user.zone == 'x'").is_err(),
            "a missing field is an error"
        );
        assert!(
            holds("data.kind")
                .unwrap_err()
                .contains("not true or false")
        );
        let key = |s: &str| Expr::compile(s).unwrap().key(&e);
        assert_eq!(key("subject"), Ok("m1".to_owned()));
        assert_eq!(key("data.object.size"), Ok("512".to_owned()));
        assert!(key("data.tags").is_err());
    }
}
