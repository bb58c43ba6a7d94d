//! What an event contributes to an aggregate ([`Spec::observe`]) and how contributions merge
//! ([`Partial::merge`]).

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::AggregateError;
use crate::fixed::{Fixed, MAX_SCALE, parse_fixed};

/// What one event contributes, as a reduce stage declares it. Fields are JSON pointers into the
/// event's data (`/objects`, `/size`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Spec {
    /// Counts by key. The field (`*` matches every element of an array: `/colours/*/name`)
    /// holds a string (one for that key), an array of strings (one for
    /// each), or an object of key to count (`{"face": 2, "plate": 1}`) added as it is.
    Count { field: String },
    /// The sum of a number, and how many numbers.
    Sum {
        field: String,
        #[serde(default)]
        scale: u32,
    },
    /// How many numbers fall in each bucket. `bounds` are the buckets' edges, increasing: bucket
    /// 0 holds numbers below `bounds[0]`, bucket i numbers in `[bounds[i-1], bounds[i])`, the last
    /// numbers at or above the last edge.
    Histogram {
        field: String,
        bounds: Vec<serde_json::Number>,
        #[serde(default)]
        scale: u32,
    },
    /// A histogram given as fractions per bucket with its weight (ch. 12: a town's family-size
    /// histogram and its population); merged weighted, so the result is the fractions of the
    /// whole population.
    Weighted {
        /// An array of fractions, one per bucket.
        fractions: String,
        /// The partial's weight.
        weight: String,
        /// The buckets' labels, as many as fractions.
        buckets: Vec<String>,
        /// Digits kept of each fraction (and weight).
        #[serde(default = "fraction_scale")]
        scale: u32,
    },
}

fn fraction_scale() -> u32 {
    9
}

/// A contribution to an aggregate, or a merge of many.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Partial {
    Count {
        counts: BTreeMap<String, u64>,
    },
    Sum {
        scale: u32,
        #[serde(with = "int_text")]
        units: i128,
        n: u64,
    },
    Histogram {
        scale: u32,
        #[serde(with = "ints_text")]
        bounds: Vec<i128>,
        counts: Vec<u64>,
    },
    Weighted {
        scale: u32,
        buckets: Vec<String>,
        /// Per bucket, the sum of weight x fraction (both at `scale`).
        #[serde(with = "ints_text")]
        mass: Vec<i128>,
        #[serde(with = "int_text")]
        weight: i128,
    },
}

impl Spec {
    /// Checks the declaration: a scale of at most 18, increasing bounds, buckets.
    pub fn check(&self) -> Result<(), String> {
        let scale = match self {
            Spec::Count { .. } => 0,
            Spec::Sum { scale, .. }
            | Spec::Histogram { scale, .. }
            | Spec::Weighted { scale, .. } => *scale,
        };
        if scale > MAX_SCALE {
            return Err(format!("scale {scale}: at most {MAX_SCALE}"));
        }
        match self {
            Spec::Histogram { bounds, scale, .. } => {
                let units = bounds
                    .iter()
                    .map(|b| parse_fixed(b, *scale).map_err(|e| e.to_string()))
                    .collect::<Result<Vec<_>, _>>()?;
                if units.is_empty() || units.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(
                        "bounds: one or more, strictly increasing (at the declared scale)".into(),
                    );
                }
            }
            Spec::Weighted { buckets, .. } if buckets.is_empty() => {
                return Err("buckets: one or more".into());
            }
            _ => {}
        }
        Ok(())
    }

    /// An empty aggregate of this kind: what merging nothing gives.
    pub fn empty(&self) -> Result<Partial, AggregateError> {
        Ok(match self {
            Spec::Count { .. } => Partial::Count {
                counts: BTreeMap::new(),
            },
            Spec::Sum { scale, .. } => Partial::Sum {
                scale: *scale,
                units: 0,
                n: 0,
            },
            Spec::Histogram { bounds, scale, .. } => {
                let bounds = bounds
                    .iter()
                    .map(|b| parse_fixed(b, *scale))
                    .collect::<Result<Vec<_>, _>>()?;
                Partial::Histogram {
                    scale: *scale,
                    counts: vec![0; bounds.len() + 1],
                    bounds,
                }
            }
            Spec::Weighted { buckets, scale, .. } => Partial::Weighted {
                scale: *scale,
                mass: vec![0; buckets.len()],
                buckets: buckets.clone(),
                weight: 0,
            },
        })
    }

    /// What the event with `data` contributes.
    pub fn observe(&self, data: &Value) -> Result<Partial, AggregateError> {
        let mut partial = self.empty()?;
        match (self, &mut partial) {
            (Spec::Count { field }, Partial::Count { counts }) => {
                let add = |counts: &mut BTreeMap<String, u64>, key: &str, n: u64| {
                    let c = counts.entry(key.to_owned()).or_default();
                    *c = c
                        .checked_add(n)
                        .ok_or_else(|| AggregateError::Overflow(format!("count of `{key}`")))?;
                    Ok::<_, AggregateError>(())
                };
                match &*at(data, field)? {
                    Value::String(key) => add(counts, key, 1)?,
                    Value::Array(keys) => {
                        for key in keys {
                            let key = key
                                .as_str()
                                .ok_or_else(|| wrong(field, "an array of strings"))?;
                            add(counts, key, 1)?;
                        }
                    }
                    Value::Object(map) => {
                        for (key, n) in map {
                            let n = n
                                .as_u64()
                                .ok_or_else(|| wrong(field, "an object of whole counts"))?;
                            add(counts, key, n)?;
                        }
                    }
                    _ => return Err(wrong(field, "a string, an array or an object of counts")),
                }
            }
            (Spec::Sum { field, scale }, Partial::Sum { units, n, .. }) => {
                *units = number(data, field, *scale)?;
                *n = 1;
            }
            (Spec::Histogram { field, scale, .. }, Partial::Histogram { bounds, counts, .. }) => {
                let value = number(data, field, *scale)?;
                counts[bounds.partition_point(|b| *b <= value)] = 1;
            }
            (
                Spec::Weighted {
                    fractions,
                    weight: weight_field,
                    scale,
                    ..
                },
                Partial::Weighted { mass, weight, .. },
            ) => {
                let given = at(data, fractions)?;
                let given = given
                    .as_array()
                    .ok_or_else(|| wrong(fractions, "an array of fractions"))?;
                if given.len() != mass.len() {
                    return Err(wrong(
                        fractions,
                        &format!("{} fractions, one per bucket", mass.len()),
                    ));
                }
                let w = number(data, weight_field, *scale)?;
                if w < 0 {
                    return Err(wrong(weight_field, "a weight of 0 or more"));
                }
                let one = 10i128.pow(*scale);
                for (m, f) in mass.iter_mut().zip(given) {
                    let f = f
                        .as_number()
                        .ok_or_else(|| wrong(fractions, "an array of numbers"))
                        .and_then(|f| parse_fixed(f, *scale))?;
                    if !(0..=one).contains(&f) {
                        return Err(wrong(fractions, "fractions between 0 and 1"));
                    }
                    *m = f.checked_mul(w).ok_or_else(|| {
                        AggregateError::Overflow(format!("`{weight_field}` x `{fractions}`"))
                    })?;
                }
                *weight = w;
            }
            _ => unreachable!("empty() makes the partial of the spec's kind"),
        }
        Ok(partial)
    }
}

/// The value at `field`, a JSON pointer in which a `*` segment stands for every element of an
/// array: `/tags/colours/*/name` is the array of the colours' names (elements without the rest
/// of the path are left out).
fn at<'v>(data: &'v Value, field: &str) -> Result<Cow<'v, Value>, AggregateError> {
    select(data, field).ok_or_else(|| AggregateError::Field {
        field: field.to_owned(),
        problem: "missing".into(),
    })
}

fn select<'v>(data: &'v Value, field: &str) -> Option<Cow<'v, Value>> {
    let Some((head, rest)) = field.split_once("/*") else {
        return data.pointer(field).map(Cow::Borrowed);
    };
    if !(rest.is_empty() || rest.starts_with('/')) {
        // `*` inside a segment's name (`/a*b`): a plain key.
        return data.pointer(field).map(Cow::Borrowed);
    }
    let items = data.pointer(head)?.as_array()?;
    let deeper = rest.contains("/*");
    let mut out = Vec::new();
    for item in items {
        match select(item, rest).map(Cow::into_owned) {
            Some(Value::Array(inner)) if deeper => out.extend(inner),
            Some(v) => out.push(v),
            None => {}
        }
    }
    Some(Cow::Owned(Value::Array(out)))
}

fn wrong(field: &str, wanted: &str) -> AggregateError {
    AggregateError::Field {
        field: field.to_owned(),
        problem: format!("wanted {wanted}"),
    }
}

fn number(data: &Value, field: &str, scale: u32) -> Result<i128, AggregateError> {
    let n = at(data, field)?;
    let n = n.as_number().ok_or_else(|| wrong(field, "a number"))?;
    parse_fixed(n, scale).map_err(|e| AggregateError::Field {
        field: field.to_owned(),
        problem: e.to_string(),
    })
}

impl Partial {
    /// Adds `other` in. Associative and commutative; refuses partials of another kind, scale or
    /// buckets.
    pub fn merge(&mut self, other: &Partial) -> Result<(), AggregateError> {
        let overflow = |what: &str| AggregateError::Overflow(what.to_owned());
        match (self, other) {
            (Partial::Count { counts }, Partial::Count { counts: more }) => {
                for (key, n) in more {
                    let c = counts.entry(key.clone()).or_default();
                    *c = c.checked_add(*n).ok_or_else(|| overflow(key))?;
                }
            }
            (
                Partial::Sum { scale, units, n },
                Partial::Sum {
                    scale: s2,
                    units: u2,
                    n: n2,
                },
            ) if scale == s2 => {
                *units = units.checked_add(*u2).ok_or_else(|| overflow("sum"))?;
                *n = n.checked_add(*n2).ok_or_else(|| overflow("sum's count"))?;
            }
            (
                Partial::Histogram {
                    scale,
                    bounds,
                    counts,
                },
                Partial::Histogram {
                    scale: s2,
                    bounds: b2,
                    counts: c2,
                },
            ) if scale == s2 && bounds == b2 && counts.len() == c2.len() => {
                for (c, more) in counts.iter_mut().zip(c2) {
                    *c = c.checked_add(*more).ok_or_else(|| overflow("histogram"))?;
                }
            }
            (
                Partial::Weighted {
                    scale,
                    buckets,
                    mass,
                    weight,
                },
                Partial::Weighted {
                    scale: s2,
                    buckets: b2,
                    mass: m2,
                    weight: w2,
                },
            ) if scale == s2 && buckets == b2 && mass.len() == m2.len() => {
                for (m, more) in mass.iter_mut().zip(m2) {
                    *m = m
                        .checked_add(*more)
                        .ok_or_else(|| overflow("weighted histogram"))?;
                }
                *weight = weight.checked_add(*w2).ok_or_else(|| overflow("weight"))?;
            }
            (mine, theirs) => {
                return Err(AggregateError::Mismatch(format!(
                    "{} with {}",
                    mine.describe(),
                    theirs.describe()
                )));
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        match self {
            Partial::Count { .. } => "a count".into(),
            Partial::Sum { scale, .. } => format!("a sum at scale {scale}"),
            Partial::Histogram { scale, bounds, .. } => {
                format!("a histogram of {} bounds at scale {scale}", bounds.len())
            }
            Partial::Weighted { scale, buckets, .. } => {
                format!(
                    "a weighted histogram of {} buckets at scale {scale}",
                    buckets.len()
                )
            }
        }
    }

    /// The aggregate as a report shows it: counts by key; a sum with its count and mean; buckets
    /// with their edges and counts; fractions of the whole weight per bucket.
    pub fn report(&self) -> Value {
        match self {
            Partial::Count { counts } => json!(counts),
            Partial::Sum { scale, units, n } => {
                let mean = (*n > 0).then(|| {
                    Fixed {
                        units: *units,
                        scale: *scale,
                    }
                    .to_json()
                    .as_f64()
                    .map(|s| s / *n as f64)
                });
                json!({
                    "sum": Fixed { units: *units, scale: *scale }.to_json(),
                    "count": n,
                    "mean": mean.flatten(),
                })
            }
            Partial::Histogram {
                scale,
                bounds,
                counts,
            } => {
                let edge = |i: usize| {
                    bounds.get(i).map(|b| {
                        Fixed {
                            units: *b,
                            scale: *scale,
                        }
                        .to_json()
                    })
                };
                let buckets: Vec<Value> = counts
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        json!({
                            "from": i.checked_sub(1).and_then(edge),
                            "to": edge(i),
                            "count": c,
                        })
                    })
                    .collect();
                json!({ "buckets": buckets, "count": counts.iter().sum::<u64>() })
            }
            Partial::Weighted {
                scale,
                buckets,
                mass,
                weight,
            } => {
                let one = 10f64.powi(*scale as i32);
                let fractions: BTreeMap<&String, Value> = buckets
                    .iter()
                    .zip(mass)
                    .map(|(b, m)| {
                        let f = if *weight == 0 {
                            0.0
                        } else {
                            *m as f64 / *weight as f64 / one
                        };
                        (b, json!(f))
                    })
                    .collect();
                json!({
                    "fractions": fractions,
                    "weight": Fixed { units: *weight, scale: *scale }.to_json(),
                })
            }
        }
    }
}

/// `i128` as a decimal string in JSON: exact for any consumer (JSON parsers often read numbers as
/// doubles).
mod int_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &i128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i128, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

mod ints_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[i128], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(ToString::to_string))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<i128>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|t| t.parse().map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: Value) -> Spec {
        let s: Spec = serde_json::from_value(v).unwrap();
        s.check().unwrap();
        s
    }

    fn reduce(spec: &Spec, events: &[Value]) -> Partial {
        let mut acc = spec.empty().unwrap();
        for e in events {
            acc.merge(&spec.observe(e).unwrap()).unwrap();
        }
        acc
    }

    /// A small deterministic generator (xorshift), so the shuffles are the same every run.
    fn shuffled<T: Clone>(items: &[T], seed: u64) -> Vec<T> {
        let mut state = seed.max(1);
        let mut out = items.to_vec();
        for i in (1..out.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            out.swap(i, (state % (i as u64 + 1)) as usize);
        }
        out
    }

    #[test]
    fn counts_strings_arrays_and_objects_of_counts() {
        let s = spec(json!({"op": "count", "field": "/objects"}));
        let acc = reduce(
            &s,
            &[
                json!({"objects": {"face": 2, "plate": 1}}),
                json!({"objects": ["face", "car"]}),
                json!({"objects": "car"}),
            ],
        );
        assert_eq!(acc.report(), json!({"car": 2, "face": 3, "plate": 1}));
        let err = s.observe(&json!({"objects": 3})).unwrap_err();
        assert!(err.to_string().contains("/objects"), "{err}");
        let err = s.observe(&json!({"other": 1})).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn a_star_in_the_field_takes_every_element_of_an_array() {
        let s = spec(json!({"op": "count", "field": "/tags/colours/*/name"}));
        let acc = reduce(
            &s,
            &[
                json!({"tags": {"colours": [{"name": "red", "share": 0.5}, {"name": "blue"}]}}),
                json!({"tags": {"colours": [{"name": "red"}, {"hex": "#000"}]}}),
                json!({"tags": {"colours": []}}),
            ],
        );
        assert_eq!(acc.report(), json!({"blue": 1, "red": 2}));
        let nested = spec(json!({"op": "count", "field": "/images/*/boxes/*/label"}));
        let acc = reduce(
            &nested,
            &[json!({"images": [
                {"boxes": [{"label": "face"}, {"label": "plate"}]},
                {"boxes": [{"label": "face"}]}
            ]})],
        );
        assert_eq!(acc.report(), json!({"face": 2, "plate": 1}));
        let err = s.observe(&json!({"tags": {"colours": "red"}})).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn sums_are_exact_whatever_the_order() {
        let s = spec(json!({"op": "sum", "field": "/v", "scale": 2}));
        let events: Vec<Value> = (0..200)
            .map(|i| json!({"v": (i as f64) * 0.01 + 0.1}))
            .collect();
        let forward = reduce(&s, &events);
        for seed in 1..20 {
            assert_eq!(reduce(&s, &shuffled(&events, seed)), forward);
        }
        // 200 x 0.1 + 0.01 x (0 + ... + 199) = 20 + 199 = 219.
        assert_eq!(
            forward.report(),
            json!({"sum": 219.0, "count": 200, "mean": 1.095})
        );
    }

    #[test]
    fn histograms_bucket_at_the_edges_and_merge_in_any_tree() {
        let s = spec(json!({"op": "histogram", "field": "/size", "bounds": [10, 100, 1000]}));
        let sizes = [0, 9, 10, 99, 100, 999, 1000, 5000, -3];
        let events: Vec<Value> = sizes.iter().map(|v| json!({"size": v})).collect();
        let all = reduce(&s, &events);
        let Partial::Histogram { counts, .. } = &all else {
            panic!("{all:?}")
        };
        assert_eq!(counts, &[3, 2, 2, 2]);
        // Leaves of any split, merged at a root, equal the whole.
        for cut in 0..=events.len() {
            let mut root = reduce(&s, &events[cut..]);
            root.merge(&reduce(&s, &events[..cut])).unwrap();
            assert_eq!(root, all, "cut at {cut}");
        }
        // Partials survive their JSON form exactly.
        let text = serde_json::to_string(&all).unwrap();
        assert_eq!(serde_json::from_str::<Partial>(&text).unwrap(), all);
        // Another bucketing does not merge.
        let other = spec(json!({"op": "histogram", "field": "/size", "bounds": [10, 100]}));
        let err = all.clone().merge(&other.empty().unwrap()).unwrap_err();
        assert!(matches!(err, AggregateError::Mismatch(_)), "{err}");
        assert!(spec_err(
            json!({"op": "histogram", "field": "/s", "bounds": [5, 5]})
        ));
        assert!(spec_err(
            json!({"op": "histogram", "field": "/s", "bounds": []})
        ));
    }

    fn spec_err(v: Value) -> bool {
        serde_json::from_value::<Spec>(v).unwrap().check().is_err()
    }

    #[test]
    fn weighted_histograms_merge_by_weight_as_in_the_book() {
        // Two towns' family-size histograms: merged by population, the result is the whole
        // population's, not the average of the two.
        let s = spec(json!({
            "op": "weighted", "fractions": "/h", "weight": "/population",
            "buckets": ["1", "2", "3+"], "scale": 6
        }));
        let towns = [
            json!({"h": [0.5, 0.25, 0.25], "population": 1000}),
            json!({"h": [0.1, 0.2, 0.7], "population": 3000}),
        ];
        let merged = reduce(&s, &towns);
        // 1: (500 + 300) / 4000 = 0.2; 2: (250 + 600) / 4000 = 0.2125; 3+: (250 + 2100) / 4000.
        assert_eq!(
            merged.report(),
            json!({"fractions": {"1": 0.2, "2": 0.2125, "3+": 0.5875}, "weight": 4000.0})
        );
        assert_eq!(reduce(&s, &[towns[1].clone(), towns[0].clone()]), merged);
        let bad = s
            .observe(&json!({"h": [0.5, 0.5], "population": 10}))
            .unwrap_err();
        assert!(bad.to_string().contains("3 fractions"), "{bad}");
        let bad = s
            .observe(&json!({"h": [1.5, 0, 0], "population": 10}))
            .unwrap_err();
        assert!(bad.to_string().contains("between 0 and 1"), "{bad}");
    }
}
