//! What a client may ask for when it creates a batch.

use std::collections::BTreeSet;

use mediaflow_coordination::FailurePolicy;
use serde::Deserialize;

/// The most items a batch may have.
pub const MAX_ITEMS: u64 = 100_000;

/// The longest timeout: a week.
pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// Body of `POST /v1/batches`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub name: String,
    /// How many uploads the batch takes (items named by their media ids).
    #[serde(default)]
    pub expected_items: Option<u64>,
    /// The file names of the batch's items: each upload must name one.
    #[serde(default)]
    pub manifest: Option<Vec<String>>,
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// Seconds after which items that never arrived count as failed.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// A validated batch request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchSpec {
    pub name: String,
    pub expected_items: u64,
    /// Empty for a batch declared by its count.
    pub manifest: BTreeSet<String>,
    pub failure_policy: FailurePolicy,
    pub timeout_secs: Option<u64>,
}

/// Why a batch request is refused; each names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("name: 1 to 200 characters, no control characters")]
    Name,
    #[error("give either expected_items or manifest, not both and not neither")]
    CountOrManifest,
    #[error("expected_items: 1 to {MAX_ITEMS}")]
    Count,
    #[error("manifest: 1 to {MAX_ITEMS} names")]
    ManifestSize,
    #[error("manifest: `{0}` is listed twice")]
    Duplicate(String),
    #[error(
        "manifest: `{0}` is not a file name (1 to 255 characters, no `/`, `\\`, control \
         characters, nor a leading dot or space)"
    )]
    BadItem(String),
    #[error("timeout_secs: 1 to {MAX_TIMEOUT_SECS}")]
    Timeout,
}

/// Whether `name` is a file name as uploads keep them: a base name with nothing stripped.
pub fn is_item_name(name: &str) -> bool {
    (1..=255).contains(&name.chars().count())
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control)
        && name.trim() == name
        && !name.starts_with('.')
}

impl BatchRequest {
    pub fn validate(&self) -> Result<BatchSpec, SpecError> {
        let name = self.name.trim();
        if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
            return Err(SpecError::Name);
        }
        let (expected_items, manifest) = match (self.expected_items, &self.manifest) {
            (Some(n), None) => {
                if !(1..=MAX_ITEMS).contains(&n) {
                    return Err(SpecError::Count);
                }
                (n, BTreeSet::new())
            }
            (None, Some(names)) => {
                if names.is_empty() || names.len() as u64 > MAX_ITEMS {
                    return Err(SpecError::ManifestSize);
                }
                let mut set = BTreeSet::new();
                for n in names {
                    if !is_item_name(n) {
                        return Err(SpecError::BadItem(n.chars().take(80).collect()));
                    }
                    if !set.insert(n.clone()) {
                        return Err(SpecError::Duplicate(n.clone()));
                    }
                }
                (set.len() as u64, set)
            }
            _ => return Err(SpecError::CountOrManifest),
        };
        if self
            .timeout_secs
            .is_some_and(|t| !(1..=MAX_TIMEOUT_SECS).contains(&t))
        {
            return Err(SpecError::Timeout);
        }
        Ok(BatchSpec {
            name: name.to_owned(),
            expected_items,
            manifest,
            failure_policy: self.failure_policy,
            timeout_secs: self.timeout_secs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> Result<BatchSpec, SpecError> {
        serde_json::from_value::<BatchRequest>(v)
            .unwrap()
            .validate()
    }

    #[test]
    fn a_batch_is_a_count_or_a_manifest_of_file_names() {
        let s = spec(json!({"name": " holiday ", "expected_items": 3})).unwrap();
        assert_eq!((s.name.as_str(), s.expected_items), ("holiday", 3));
        assert_eq!(s.failure_policy, FailurePolicy::FailBatch);
        let s = spec(json!({"name": "h", "manifest": ["a.jpg", "b.jpg"],
            "failure_policy": "complete-partial", "timeout_secs": 60}))
        .unwrap();
        assert_eq!(s.expected_items, 2);
        assert_eq!(s.failure_policy, FailurePolicy::CompletePartial);

        let refused = [
            (json!({"name": "", "expected_items": 1}), SpecError::Name),
            (json!({"name": "h"}), SpecError::CountOrManifest),
            (
                json!({"name": "h", "expected_items": 1, "manifest": ["a"]}),
                SpecError::CountOrManifest,
            ),
            (json!({"name": "h", "expected_items": 0}), SpecError::Count),
            (
                json!({"name": "h", "manifest": []}),
                SpecError::ManifestSize,
            ),
            (
                json!({"name": "h", "manifest": ["a", "a"]}),
                SpecError::Duplicate("a".into()),
            ),
            (
                json!({"name": "h", "manifest": ["x/a"]}),
                SpecError::BadItem("x/a".into()),
            ),
            (
                json!({"name": "h", "manifest": [".hidden"]}),
                SpecError::BadItem(".hidden".into()),
            ),
            (
                json!({"name": "h", "expected_items": 1, "timeout_secs": 0}),
                SpecError::Timeout,
            ),
        ];
        for (body, error) in refused {
            assert_eq!(spec(body.clone()), Err(error), "{body}");
        }
        assert!(
            serde_json::from_value::<BatchRequest>(json!({"name": "h", "extra": 1})).is_err(),
            "unknown fields are refused"
        );
    }
}
