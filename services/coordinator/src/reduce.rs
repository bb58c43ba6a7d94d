//! The `reduce` stage kind (ch. 12): mergeable partial aggregates (`count` by key, `sum`,
//! `histogram`, the weighted histogram merge) per group, reported once when the group closes.
//!
//! - `group_by: batch`: an input is an event about an item of a batch (its data names the batch
//!   under `batch.batch_id`); the group closes when the batch join's `mediaflow.batch.completed`
//!   has arrived and every item it lists as completed has been reduced. The report merges exactly
//!   those items, whatever else came (a straggler the batch's deadline left out is not in it).
//! - `group_by: window`: an input belongs to the tumbling window of its event time; the group
//!   closes once the watermark (the latest event time seen, less the allowed lateness) passes the
//!   window's end. An input for a closed window goes to port `late`, never into a report.
//! - `merge: [stage, ...]`: a root over leaf reducers: its inputs are their reports, and a group
//!   closes once every named leaf reported it. The partials merge exactly, so a tree of reducers
//!   reports what one reducer over every input would.
//!
//! Each input's contribution is kept (keyed by what it is about, so a repeat is a no-op) until
//! its group reports; the report is upserted into `reports` (and, for a batch, `batches.report`)
//! and emitted on port `out` through the emission ledger, in the transaction that closed it.

use std::collections::{BTreeMap, BTreeSet};

use cloudevents::{AttributesReader, Event};
use mediaflow_coordination::{Partial, Spec, Tumbling, Watermark};
use mediaflow_db::Db;
use mediaflow_events::{
    BatchCompleted, EventData, JoinOutcome, LateEvent, Report, ReportGroup, data_json,
};
use mediaflow_runtime::{Handler, Output, StageError};
use mediaflow_telemetry::Metrics;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{AnyConnection, Row};

use crate::ledger::{Emission, Relay};
use crate::{db_error, now_rfc3339};

/// What a reducer groups by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    Batch,
    Window,
}

/// Tumbling event-time windows.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    pub size_secs: u64,
    /// How far behind the latest event time an event may be and still count.
    #[serde(default)]
    pub allowed_lateness_secs: u64,
}

/// A reduce stage's settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReduceConfig {
    pub group_by: GroupBy,
    /// For `group_by: window`.
    pub window: Option<WindowConfig>,
    /// Aggregate name -> what each input contributes (`op`: count, sum, histogram, weighted).
    #[serde(default)]
    pub aggregates: BTreeMap<String, Spec>,
    /// The reduce stages whose reports this one merges (a root over leaves), instead of
    /// `aggregates` over events.
    #[serde(default)]
    pub merge: Vec<String>,
    /// `group_by: batch`: this reducer's report is the batch's own (`report` of
    /// `GET /v1/batches/{id}`; every reducer's is under `reports`).
    #[serde(default)]
    pub batch_report: bool,
}

impl ReduceConfig {
    /// Problems with the settings, as a message.
    pub fn check(&self) -> Result<(), String> {
        match (self.aggregates.is_empty(), self.merge.is_empty()) {
            (true, true) => return Err("a reducer needs `aggregates`, or `merge` to merge other reducers' reports".into()),
            (false, false) => return Err("a reducer has `aggregates` (over events) or `merge` (over other reducers' reports), not both".into()),
            _ => {}
        }
        for (name, spec) in &self.aggregates {
            spec.check()
                .map_err(|e| format!("aggregate `{name}`: {e}"))?;
        }
        match (self.group_by, self.window) {
            (GroupBy::Window, None) if self.merge.is_empty() => {
                Err("`group_by: window` needs `window: {size_secs: ...}`".into())
            }
            (GroupBy::Window, Some(w)) if w.size_secs == 0 => {
                Err("`window.size_secs` must be at least 1".into())
            }
            (GroupBy::Batch, Some(_)) => Err("`window` is for `group_by: window`".into()),
            (GroupBy::Window, _) if self.batch_report => {
                Err("`batch_report` is for `group_by: batch`".into())
            }
            _ => Ok(()),
        }
    }

    /// The ports it writes: `out`, and `late` for a windowed reducer over events.
    pub fn ports(&self) -> Vec<String> {
        let mut ports = vec!["out".to_owned()];
        if self.group_by == GroupBy::Window && self.merge.is_empty() {
            ports.push("late".to_owned());
        }
        ports
    }
}

/// One input's contribution to a group.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Contribution {
    partials: BTreeMap<String, Partial>,
    /// For a leaf's report: how many inputs it covers, its outcome and failures.
    #[serde(default)]
    inputs: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outcome: Option<JoinOutcome>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    failures: BTreeMap<String, String>,
}

/// What closes a batch group: the batch join's release.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Closing {
    outcome: JoinOutcome,
    /// Item name -> media id.
    items: BTreeMap<String, String>,
    failures: BTreeMap<String, String>,
}

/// A reduce stage.
pub struct Reduce {
    stage: String,
    config: ReduceConfig,
    /// Port -> topic.
    ports: BTreeMap<String, String>,
    source: String,
    db: Db,
    metrics: Metrics,
    relay: Relay,
}

impl Reduce {
    pub fn new(
        stage: &str,
        config: ReduceConfig,
        ports: BTreeMap<String, String>,
        db: Db,
        metrics: Metrics,
        relay: Relay,
    ) -> Self {
        Self {
            stage: stage.to_owned(),
            config,
            ports,
            source: format!("/mediaflow/{stage}"),
            db,
            metrics,
            relay,
        }
    }

    fn port(&self, port: &str) -> Result<&str, StageError> {
        self.ports
            .get(port)
            .map(String::as_str)
            .ok_or_else(|| StageError::permanent(format!("port `{port}` is bound to no topic")))
    }

    async fn input(&self, event: &Event) -> Result<(), StageError> {
        let bad = |e: mediaflow_events::EventError| StageError::bad_input(e.to_string());
        if !self.config.merge.is_empty() {
            if event.ty() != Report::TYPE {
                return Ok(());
            }
            let report: Report = mediaflow_events::decode(event).map_err(bad)?;
            if !self.config.merge.contains(&report.stage) {
                return Ok(());
            }
            let partials = report
                .partials
                .iter()
                .map(|(name, p)| {
                    serde_json::from_value::<Partial>(p.clone())
                        .map(|p| (name.clone(), p))
                        .map_err(|e| {
                            StageError::bad_input(format!(
                                "report of `{}`: partial `{name}`: {e}",
                                report.stage
                            ))
                        })
                })
                .collect::<Result<_, _>>()?;
            let contribution = Contribution {
                partials,
                inputs: report.inputs,
                outcome: report.outcome,
                failures: report.failures.clone(),
            };
            return self
                .contribute(&report.group, &report.stage, &contribution)
                .await;
        }
        match self.config.group_by {
            GroupBy::Batch if event.ty() == BatchCompleted::TYPE => {
                let done: BatchCompleted = mediaflow_events::decode(event).map_err(bad)?;
                let group = ReportGroup::Batch {
                    batch_id: done.batch_id.clone(),
                };
                let closing = Closing {
                    outcome: done.outcome,
                    items: done.items,
                    failures: done.failures,
                };
                self.close_batch(&group, &closing).await
            }
            GroupBy::Batch => {
                let data = data_json(event).map_err(bad)?;
                let Some(batch_id) = data.pointer("/batch/batch_id").and_then(Value::as_str) else {
                    return Ok(());
                };
                if data
                    .get("outcome")
                    .and_then(Value::as_str)
                    .is_some_and(|o| o != JoinOutcome::Complete.as_str())
                {
                    // Not completed: the batch's release lists it among the failures.
                    return Ok(());
                }
                let input = event.subject().unwrap_or(event.id()).to_owned();
                let contribution = self.observe(&data)?;
                let group = ReportGroup::Batch {
                    batch_id: batch_id.to_owned(),
                };
                self.contribute(&group, &input, &contribution).await
            }
            GroupBy::Window => self.windowed(event).await,
        }
    }

    fn observe(&self, data: &Value) -> Result<Contribution, StageError> {
        let partials = self
            .config
            .aggregates
            .iter()
            .map(|(name, spec)| {
                spec.observe(data)
                    .map(|p| (name.clone(), p))
                    .map_err(|e| StageError::bad_input(format!("aggregate `{name}`: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Contribution {
            partials,
            inputs: 1,
            ..Contribution::default()
        })
    }

    /// Adds `contribution` of `input` to `group` (once), and reports the group if that closes it.
    async fn contribute(
        &self,
        group: &ReportGroup,
        input: &str,
        contribution: &Contribution,
    ) -> Result<(), StageError> {
        let now = Db::now_ms();
        let mut tx = self.db.pool().begin().await.map_err(db_error)?;
        self.lock_group(&mut tx, group, None).await?;
        self.insert_input(&mut tx, group, input, contribution)
            .await?;
        let reported = self.try_report(&mut tx, group, now).await?;
        tx.commit().await.map_err(db_error)?;
        self.reported(reported);
        Ok(())
    }

    async fn close_batch(&self, group: &ReportGroup, closing: &Closing) -> Result<(), StageError> {
        let now = Db::now_ms();
        let mut tx = self.db.pool().begin().await.map_err(db_error)?;
        self.lock_group(&mut tx, group, None).await?;
        let text =
            serde_json::to_string(closing).map_err(|e| StageError::permanent(e.to_string()))?;
        sqlx::query(
            "UPDATE reduce_groups SET closing = $3 WHERE stage = $1 AND grp = $2 \
             AND closing IS NULL",
        )
        .bind(&self.stage)
        .bind(group.key())
        .bind(text)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let reported = self.try_report(&mut tx, group, now).await?;
        tx.commit().await.map_err(db_error)?;
        self.reported(reported);
        Ok(())
    }

    fn reported(&self, reported: bool) {
        if reported {
            self.metrics.coordinated(&self.stage, "reported");
            self.relay.wake();
        }
    }

    /// Keeps `input`'s contribution to `group`, once: a repeat of the input changes nothing.
    async fn insert_input(
        &self,
        conn: &mut AnyConnection,
        group: &ReportGroup,
        input: &str,
        contribution: &Contribution,
    ) -> Result<(), StageError> {
        let text = serde_json::to_string(contribution)
            .map_err(|e| StageError::permanent(e.to_string()))?;
        sqlx::query(
            "INSERT INTO reduce_inputs (stage, grp, input, partials) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (stage, grp, input) DO NOTHING",
        )
        .bind(&self.stage)
        .bind(group.key())
        .bind(input)
        .bind(text)
        .execute(conn)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    /// Makes sure `group` has its row, and locks it for this transaction.
    async fn lock_group(
        &self,
        conn: &mut AnyConnection,
        group: &ReportGroup,
        window_end_ms: Option<i64>,
    ) -> Result<(), StageError> {
        sqlx::query(
            "INSERT INTO reduce_groups (stage, grp, window_end_ms, reported) \
             VALUES ($1, $2, $3, 0) ON CONFLICT (stage, grp) DO NOTHING",
        )
        .bind(&self.stage)
        .bind(group.key())
        .bind(window_end_ms)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
        sqlx::query("UPDATE reduce_groups SET reported = reported WHERE stage = $1 AND grp = $2")
            .bind(&self.stage)
            .bind(group.key())
            .execute(&mut *conn)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    /// Reports `group` if it is closed and not reported yet; whether it did.
    async fn try_report(
        &self,
        conn: &mut AnyConnection,
        group: &ReportGroup,
        now: i64,
    ) -> Result<bool, StageError> {
        let key = group.key();
        let row = sqlx::query(
            "SELECT closing, window_end_ms, reported FROM reduce_groups WHERE stage = $1 AND grp = $2",
        )
        .bind(&self.stage)
        .bind(&key)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_error)?;
        if row.try_get::<i64, _>("reported").map_err(db_error)? != 0 {
            return Ok(false);
        }
        let closing: Option<String> = row.try_get("closing").map_err(db_error)?;
        if closing.is_none()
            && self.config.merge.is_empty()
            && matches!(group, ReportGroup::Batch { .. })
        {
            // A leaf's batch group reports once its batch closed: until then, reading its inputs
            // (every one so far, on every input) would make a batch cost the square of its size.
            return Ok(false);
        }
        let inputs: BTreeMap<String, Contribution> =
            sqlx::query("SELECT input, partials FROM reduce_inputs WHERE stage = $1 AND grp = $2")
                .bind(&self.stage)
                .bind(&key)
                .fetch_all(&mut *conn)
                .await
                .map_err(db_error)?
                .into_iter()
                .map(|r| {
                    let input: String = r.try_get("input").map_err(db_error)?;
                    let text: String = r.try_get("partials").map_err(db_error)?;
                    let c: Contribution = serde_json::from_str(&text).map_err(|e| {
                        StageError::permanent(format!("contribution {input} to {key}: {e}"))
                    })?;
                    Ok((input, c))
                })
                .collect::<Result<_, StageError>>()?;

        let report = if !self.config.merge.is_empty() {
            // A root: closed once every leaf reported.
            if !self
                .config
                .merge
                .iter()
                .all(|leaf| inputs.contains_key(leaf))
            {
                return Ok(false);
            }
            let outcome = inputs
                .values()
                .filter_map(|c| c.outcome)
                .max_by_key(|o| severity(*o));
            let failures = inputs.values().flat_map(|c| c.failures.clone()).collect();
            let count = inputs.values().map(|c| c.inputs).max().unwrap_or(0);
            self.merged(group, inputs.values(), outcome, failures, count)?
        } else if let ReportGroup::Batch { .. } = group {
            let Some(closing) = closing else {
                return Ok(false);
            };
            let closing: Closing = serde_json::from_str(&closing)
                .map_err(|e| StageError::permanent(format!("closing of {key}: {e}")))?;
            if closing.outcome == JoinOutcome::Failed {
                self.merged(group, [].iter(), Some(closing.outcome), closing.failures, 0)?
            } else {
                let media: BTreeSet<&String> = closing.items.values().collect();
                if !media.iter().all(|m| inputs.contains_key(*m)) {
                    return Ok(false);
                }
                let covered = inputs
                    .iter()
                    .filter(|(input, _)| media.contains(input))
                    .map(|(_, c)| c);
                self.merged(
                    group,
                    covered,
                    Some(closing.outcome),
                    closing.failures,
                    media.len() as u64,
                )?
            }
        } else {
            let count = inputs.len() as u64;
            self.merged(group, inputs.values(), None, BTreeMap::new(), count)?
        };

        let text =
            serde_json::to_string(&report).map_err(|e| StageError::permanent(e.to_string()))?;
        let batch_id = batch_id_of(group);
        sqlx::query(
            "INSERT INTO reports (stage, grp, batch_id, report, reported_at_ms) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (stage, grp) DO UPDATE SET \
             report = excluded.report, reported_at_ms = excluded.reported_at_ms",
        )
        .bind(&self.stage)
        .bind(&key)
        .bind(batch_id)
        .bind(&text)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
        if let (true, Some(batch_id)) = (self.config.batch_report, &batch_id_of(group)) {
            sqlx::query("UPDATE batches SET report = $2 WHERE id = $1")
                .bind(batch_id)
                .bind(&text)
                .execute(&mut *conn)
                .await
                .map_err(db_error)?;
        }
        sqlx::query("UPDATE reduce_groups SET reported = 1 WHERE stage = $1 AND grp = $2")
            .bind(&self.stage)
            .bind(&key)
            .execute(&mut *conn)
            .await
            .map_err(db_error)?;
        Emission::of(self.port("out")?, &self.source, &report)?
            .record(conn, &self.stage, now)
            .await
            .map_err(db_error)?;
        Ok(true)
    }

    /// The report of `group` over `contributions`.
    fn merged<'c>(
        &self,
        group: &ReportGroup,
        contributions: impl Iterator<Item = &'c Contribution>,
        outcome: Option<JoinOutcome>,
        failures: BTreeMap<String, String>,
        inputs: u64,
    ) -> Result<Report, StageError> {
        let mut total: BTreeMap<String, Partial> = BTreeMap::new();
        for (name, spec) in &self.config.aggregates {
            total.insert(
                name.clone(),
                spec.empty()
                    .map_err(|e| StageError::permanent(format!("aggregate `{name}`: {e}")))?,
            );
        }
        if outcome != Some(JoinOutcome::Failed) {
            for c in contributions {
                for (name, p) in &c.partials {
                    match total.get_mut(name) {
                        Some(t) => t.merge(p).map_err(|e| {
                            StageError::permanent(format!("aggregate `{name}`: {e}"))
                        })?,
                        None => {
                            total.insert(name.clone(), p.clone());
                        }
                    }
                }
            }
        } else {
            total.clear();
        }
        let aggregates = total.iter().map(|(n, p)| (n.clone(), p.report())).collect();
        let partials = total
            .iter()
            .map(|(n, p)| {
                serde_json::to_value(p)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| StageError::permanent(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Report {
            stage: self.stage.clone(),
            group: group.clone(),
            outcome,
            inputs,
            aggregates,
            partials,
            failures,
            reported_at: now_rfc3339(),
        })
    }

    /// An input of a windowed reducer.
    async fn windowed(&self, event: &Event) -> Result<(), StageError> {
        let window_config = self
            .config
            .window
            .ok_or_else(|| StageError::permanent("a windowed reducer without `window`"))?;
        let t = event.time().ok_or_else(|| {
            StageError::bad_input(format!(
                "event {} has no time: a windowed reducer places inputs by event time",
                event.id()
            ))
        })?;
        let t_ms = t.timestamp_millis();
        let tumbling = Tumbling::new(tumbling_size(&window_config))
            .ok_or_else(|| StageError::permanent("a window of no size"))?;
        let window = tumbling.window(t_ms);
        let group = ReportGroup::Window {
            start_ms: window.start_ms,
            end_ms: window.end_ms,
        };
        let data = data_json(event).map_err(|e| StageError::bad_input(e.to_string()))?;
        let lateness = window_config.allowed_lateness_secs as i64 * 1000;
        let now = Db::now_ms();

        let mut tx = self.db.pool().begin().await.map_err(db_error)?;
        sqlx::query(
            "INSERT INTO reduce_watermarks (stage, max_time_ms) VALUES ($1, $2) \
             ON CONFLICT (stage) DO NOTHING",
        )
        .bind(&self.stage)
        .bind(i64::MIN)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        sqlx::query("UPDATE reduce_watermarks SET max_time_ms = max_time_ms WHERE stage = $1")
            .bind(&self.stage)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        let seen: i64 =
            sqlx::query_scalar("SELECT max_time_ms FROM reduce_watermarks WHERE stage = $1")
                .bind(&self.stage)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_error)?;
        let mut watermark = Watermark::new(lateness);
        if seen != i64::MIN {
            watermark.observe(seen);
        }
        let input = event.id().to_owned();
        let already: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM reduce_inputs WHERE stage = $1 AND grp = $2 AND input = $3",
        )
        .bind(&self.stage)
        .bind(group.key())
        .bind(&input)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
        let mut late = false;
        if already.is_none() && watermark.closes(&window) {
            late = true;
            let data = LateEvent {
                stage: self.stage.clone(),
                event_id: input.clone(),
                event_type: event.ty().to_owned(),
                event_time: t.to_rfc3339(),
                window_start_ms: window.start_ms,
                window_end_ms: window.end_ms,
                watermark_ms: watermark.now_ms().unwrap_or(i64::MIN),
                data,
            };
            Emission::of(self.port("late")?, &self.source, &data)?
                .record(&mut tx, &self.stage, now)
                .await
                .map_err(db_error)?;
        } else if already.is_none() {
            let contribution = self.observe(&data)?;
            self.lock_group(&mut tx, &group, Some(window.end_ms))
                .await?;
            self.insert_input(&mut tx, &group, &input, &contribution)
                .await?;
            watermark.observe(t_ms);
            sqlx::query(
                "UPDATE reduce_watermarks SET max_time_ms = $2 WHERE stage = $1 AND max_time_ms < $2",
            )
            .bind(&self.stage)
            .bind(t_ms)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        }
        // Every window the watermark has passed reports now.
        let mut reported = 0;
        if let Some(up_to) = watermark.now_ms() {
            let due: Vec<i64> = sqlx::query_scalar(
                "SELECT window_end_ms FROM reduce_groups WHERE stage = $1 AND reported = 0 \
                 AND window_end_ms IS NOT NULL AND window_end_ms <= $2",
            )
            .bind(&self.stage)
            .bind(up_to)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_error)?;
            for end_ms in due {
                let group = ReportGroup::Window {
                    start_ms: end_ms - tumbling_size(&window_config),
                    end_ms,
                };
                if self.try_report(&mut tx, &group, now).await? {
                    reported += 1;
                }
            }
        }
        tx.commit().await.map_err(db_error)?;
        if late {
            self.metrics.late_event(&self.stage);
            self.relay.wake();
            tracing::info!(stage = %self.stage, event = %input, window_end_ms = window.end_ms, "a late event went to the late topic");
        }
        for _ in 0..reported {
            self.reported(true);
        }
        Ok(())
    }
}

fn batch_id_of(group: &ReportGroup) -> Option<String> {
    match group {
        ReportGroup::Batch { batch_id } => Some(batch_id.clone()),
        ReportGroup::Window { .. } => None,
    }
}

fn tumbling_size(config: &WindowConfig) -> i64 {
    config.size_secs as i64 * 1000
}

/// Which outcome wins when leaves disagree: failed over partial over complete.
fn severity(outcome: JoinOutcome) -> u8 {
    match outcome {
        JoinOutcome::Complete => 0,
        JoinOutcome::Partial => 1,
        JoinOutcome::Failed => 2,
    }
}

impl Handler for Reduce {
    async fn handle(&self, event: &Event) -> Result<Vec<Output>, StageError> {
        self.input(event).await?;
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        let parse = |v: Value| serde_json::from_value::<ReduceConfig>(v).unwrap().check();
        assert!(parse(serde_json::json!({"group_by": "batch"})).is_err());
        assert!(
            parse(serde_json::json!({"group_by": "window",
            "aggregates": {"n": {"op": "count", "field": "/k"}}}))
            .unwrap_err()
            .contains("window")
        );
        assert!(
            parse(serde_json::json!({"group_by": "batch",
            "aggregates": {"n": {"op": "count", "field": "/k"}}, "merge": ["a"]}))
            .is_err()
        );
        parse(serde_json::json!({"group_by": "batch", "merge": ["a", "b"]})).unwrap();
        parse(
            serde_json::json!({"group_by": "window", "window": {"size_secs": 60},
            "aggregates": {"n": {"op": "count", "field": "/k"}}}),
        )
        .unwrap();
    }
}
