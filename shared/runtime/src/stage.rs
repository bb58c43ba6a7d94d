//! The consume loop of one stage instance, and the life of one message in it.
//!
//! The loop keeps polling the consumer so that long jobs never cost the group membership. When
//! it has as many messages in flight as allowed it stops taking messages; if it is still full
//! after `HOLD_BEFORE_PAUSE` it pauses fetching and polls on. (Pausing at once would cost a
//! refetch of what the consumer had prefetched each time a slot frees: a quick stage would spend
//! its time waiting for fetches.)
//! Each message runs as its own task; messages with the same key run one after another, in
//! order. A finished message moves its partition's commit position only as far as every earlier
//! message of that partition is finished too (`OffsetTracker`); the task stores that position
//! itself, so progress is recorded even while the loop waits in a rebalance.
//!
//! When partitions are revoked (another instance joined, or this one is leaving), the consumer
//! waits in its rebalance callback while the messages being handled for them finish, up to the
//! drain deadline, and commits them; messages of those partitions not started yet are dropped,
//! uncommitted, for the partitions' next owner.

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cloudevents::{AttributesReader, Event};
use futures::FutureExt;
use mediaflow_bus::{BusError, Delivery, RevokeListener};
use mediaflow_events::{DeadLetter, EventData, MessageSource};
use mediaflow_telemetry::Metrics;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::limit::Limit;
use crate::{
    Bound, ErrorClass, Handler, OffsetTracker, Output, Ports, RetryPolicy, Sink, Source,
    StageError, StageProbe, Tracker,
};

/// How long the loop may stay full without polling the consumer before it pauses fetching and
/// polls again (for rebalances and the poll interval); far below `max.poll.interval.ms`.
const HOLD_BEFORE_PAUSE: Duration = Duration::from_secs(1);
/// How long a handler works on a message before its tracker hears that it is running: most
/// messages (a filter's, a copier's, a join's) are done sooner, and need no write for it.
pub const RUNNING_AFTER: Duration = Duration::from_millis(250);

/// How a stage instance runs.
#[derive(Clone, Copy, Debug)]
pub struct StageOptions {
    /// Messages in flight at once (being handled, waiting for a retry, or queued behind a
    /// message with the same key); with `adaptive`, the most.
    pub concurrency: usize,
    /// Size the in-flight limit from measured latency, between 2 and `concurrency` (see
    /// `limit.rs`), instead of holding it at `concurrency`.
    pub adaptive: bool,
    /// Attempts at a message that keeps failing transiently before it is dead-lettered.
    pub max_attempts: u32,
    pub retry: RetryPolicy,
    /// On shutdown, how long messages being handled may take to finish before they are handed
    /// back (left uncommitted, to be redelivered).
    pub drain_deadline: Duration,
}

impl Default for StageOptions {
    fn default() -> Self {
        Self {
            concurrency: 4,
            adaptive: false,
            max_attempts: 10,
            retry: RetryPolicy::default(),
            drain_deadline: Duration::from_secs(30),
        }
    }
}

/// How a stage instance ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Every message taken was finished and its offset committed.
    Drained,
    /// Some messages were not finished by the deadline; they stay uncommitted and will be
    /// delivered again (to this stage's next instance).
    HandedBack { messages: usize },
}

/// What a stage task reports when it ends.
struct Finished {
    key: Option<String>,
    started: Instant,
    outcome: Outcome,
}

type PartitionId = (String, i32);

/// Progress shared by the loop, its tasks and the revoke listener.
#[derive(Default)]
struct Progress {
    offsets: OffsetTracker,
    /// Messages being handled (started, not finished) per partition.
    running: HashMap<PartitionId, usize>,
    /// Partitions revoked since the loop last looked: their waiting messages are dropped.
    revoked: Vec<PartitionId>,
}

/// The shared progress of one stage instance, with a signal for "a message finished".
#[derive(Default)]
struct Shared {
    progress: Mutex<Progress>,
    finished: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Waits, when partitions are revoked, for their messages being handled to finish.
struct Revoker {
    stage: String,
    shared: Arc<Shared>,
    deadline: Duration,
}

impl Revoker {
    fn running_in(progress: &Progress, partitions: &[PartitionId]) -> usize {
        partitions
            .iter()
            .filter_map(|p| progress.running.get(p))
            .sum()
    }

    /// Blocks until no message of `partitions` is being handled, or the deadline passes.
    fn wait(&self, partitions: &[PartitionId]) -> usize {
        let until = Instant::now() + self.deadline;
        let mut progress = self.shared.lock();
        loop {
            let running = Self::running_in(&progress, partitions);
            let left = until.saturating_duration_since(Instant::now());
            if running == 0 || left.is_zero() {
                return running;
            }
            progress = self
                .shared
                .finished
                .wait_timeout(progress, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}

impl RevokeListener for Revoker {
    fn revoking(&self, partitions: &[(String, i32)]) {
        let running = Self::running_in(&self.shared.lock(), partitions);
        let left = if running == 0 {
            0
        } else {
            tracing::info!(stage = %self.stage, partitions = partitions.len(), running, "partitions revoked; letting their messages finish");
            // The consumer is polled on a runtime worker: hand the worker's other tasks to
            // another thread while this one waits. Without a multi-threaded runtime the
            // messages cannot progress while we wait, so they are handed back at once.
            match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
                Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                    tokio::task::block_in_place(|| self.wait(partitions))
                }
                _ => running,
            }
        };
        if left > 0 {
            tracing::warn!(stage = %self.stage, left, "revoked partitions' messages outlasted the drain deadline; their next owner gets them again");
        }
        let mut progress = self.shared.lock();
        for (topic, partition) in partitions {
            progress.offsets.forget(topic, *partition);
        }
        progress.revoked.extend_from_slice(partitions);
    }
}

enum Outcome {
    /// Finished: succeeded (`ok`) or dead-lettered (the error class).
    Done(&'static str),
    /// Shutdown came first; the message stays uncommitted.
    HandedBack,
}

struct Context<H> {
    stage: String,
    handler: Arc<H>,
    sink: Arc<dyn Sink>,
    ports: Ports,
    dead_letters: String,
    tracker: Option<Arc<dyn Tracker>>,
    options: StageOptions,
    metrics: Metrics,
    /// Cancelled when the stage stops taking work: waits between attempts end at once.
    hand_back: CancellationToken,
}

/// The mutable state of the loop.
struct Loop<H> {
    ctx: Arc<Context<H>>,
    consumer: Arc<dyn Source>,
    shared: Arc<Shared>,
    tasks: JoinSet<Finished>,
    /// Keys with a message in flight, and the messages of that key waiting behind it.
    keys: HashMap<String, VecDeque<Delivery>>,
    /// Messages received while at capacity (fetching is paused meanwhile).
    overflow: VecDeque<Delivery>,
    paused: bool,
    /// How many messages may be in flight now.
    limit: Limit,
}

/// One stage instance to run: what it does, where its outputs and failures go, how it runs and
/// who watches it.
pub struct StageRun<H> {
    /// The stage's name, in logs and metrics.
    pub name: String,
    pub handler: Arc<H>,
    /// Where its outputs and dead letters are published.
    pub sink: Arc<dyn Sink>,
    /// Its output ports, bound to topics.
    pub ports: Ports,
    /// The dead-letter topic.
    pub dead_letters: String,
    /// Where its progress on each entity is recorded, if anywhere.
    pub tracker: Option<Arc<dyn Tracker>>,
    pub options: StageOptions,
    pub metrics: Metrics,
    /// Filled in for the stage's watchdog; its rejoin request drains the instance like a
    /// shutdown.
    pub probe: StageProbe,
}

/// Runs `run` until `shutdown` is cancelled (or its probe asks for a rejoin), then drains:
/// stops taking messages, lets the ones being handled finish within the drain deadline, commits,
/// and leaves the group. `subscribe` creates the stage's consumer around the listener the
/// runtime gives it.
pub async fn run_stage<H: Handler, S: Source>(
    run: StageRun<H>,
    subscribe: impl FnOnce(Arc<dyn RevokeListener>) -> Result<S, BusError>,
    shutdown: CancellationToken,
) -> Result<Stopped, BusError> {
    let StageRun {
        name,
        handler,
        sink,
        ports,
        dead_letters,
        tracker,
        options,
        metrics,
        probe,
    } = run;
    let stage = name.as_str();
    let shared = Arc::new(Shared::default());
    let consumer: Arc<dyn Source> = Arc::new(subscribe(Arc::new(Revoker {
        stage: stage.to_owned(),
        shared: shared.clone(),
        deadline: options.drain_deadline,
    }))?);
    probe.attach(&consumer);
    tracing::info!(
        stage,
        group = consumer.group(),
        concurrency = options.concurrency,
        "stage started"
    );
    let ctx = Arc::new(Context {
        stage: stage.to_owned(),
        handler,
        sink,
        ports,
        dead_letters,
        tracker,
        options: StageOptions {
            concurrency: options.concurrency.max(1),
            ..options
        },
        metrics,
        hand_back: CancellationToken::new(),
    });
    let mut l = Loop {
        ctx,
        consumer,
        shared,
        tasks: JoinSet::new(),
        keys: HashMap::new(),
        overflow: VecDeque::new(),
        paused: false,
        limit: Limit::new(options.concurrency, options.adaptive),
    };
    l.ctx.metrics.stage_limit(stage, l.limit.get());
    let rejoin = probe.rejoin_token().clone();
    let mut fatal = None;
    // Since when the loop has been full and not polling.
    let mut full_since: Option<tokio::time::Instant> = None;
    loop {
        let full = l.at_capacity() || !l.overflow.is_empty();
        if !full || l.paused {
            full_since = None;
        } else if full_since.is_none() {
            full_since = Some(tokio::time::Instant::now());
        }
        let pause_at = full_since.map(|since| since + HOLD_BEFORE_PAUSE);
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            () = rejoin.cancelled() => {
                tracing::warn!(stage, "leaving the group to join it again");
                break;
            }
            Some(joined) = l.tasks.join_next(), if !l.tasks.is_empty() => {
                l.finished(joined);
                l.refill();
            }
            // Full for a while (long jobs): pause fetching and poll on, keeping the membership.
            () = tokio::time::sleep_until(pause_at.unwrap_or_else(tokio::time::Instant::now)), if pause_at.is_some() => {
                l.pause();
            }
            delivery = l.consumer.recv(), if !full || l.paused => {
                // A rebalance runs inside `recv`: drop what waits for partitions that left.
                l.forget_revoked();
                l.refill();
                match delivery {
                    Ok(d) => l.received(d),
                    Err(BusError::Fatal(why)) => {
                        tracing::error!(stage, error = %why, "the consumer failed for good; leaving");
                        l.ctx.metrics.stage_error(stage, "consumer");
                        fatal = Some(why);
                        break;
                    }
                    Err(e) => {
                        // The broker briefly unreachable: librdkafka recovers.
                        tracing::warn!(stage, error = %e, "consumer error");
                        l.ctx.metrics.stage_error(stage, "consumer");
                    }
                }
            }
        }
        let in_flight = l.in_flight();
        probe.set_in_flight(in_flight);
        l.ctx.metrics.stage_in_flight(stage, in_flight);
    }
    let stopped = l.drain().await;
    probe.set_in_flight(0);
    l.ctx.metrics.stage_in_flight(stage, 0);
    if let Some(why) = fatal {
        // Its offsets cannot be committed any more: what it finished is delivered again.
        return Err(BusError::Fatal(why));
    }
    l.consumer.close()?;
    tracing::info!(stage, ?stopped, "stage stopped");
    Ok(stopped)
}

impl<H: Handler> Loop<H> {
    fn in_flight(&self) -> usize {
        self.shared.lock().offsets.in_flight()
    }

    fn at_capacity(&self) -> bool {
        self.in_flight() >= self.limit.get()
    }

    fn received(&mut self, delivery: Delivery) {
        if self.at_capacity() || !self.overflow.is_empty() {
            self.overflow.push_back(delivery);
            // Paused again each time: partitions assigned since the last pause fetch otherwise.
            self.pause();
        } else {
            self.take(delivery);
        }
    }

    fn pause(&mut self) {
        match self.consumer.pause_all() {
            Ok(()) => self.paused = true,
            Err(e) => tracing::warn!(stage = %self.ctx.stage, error = %e, "could not pause"),
        }
    }

    /// Takes messages from the overflow while there is room; resumes fetching once it is empty.
    fn refill(&mut self) {
        while !self.at_capacity() {
            let Some(d) = self.overflow.pop_front() else {
                break;
            };
            self.take(d);
        }
        if self.paused && self.overflow.is_empty() && !self.at_capacity() {
            match self.consumer.resume_all() {
                Ok(()) => self.paused = false,
                Err(e) => tracing::warn!(stage = %self.ctx.stage, error = %e, "could not resume"),
            }
        }
    }

    /// Drops the messages waiting (in the overflow or behind their key) for partitions that were
    /// revoked; their next owner reads them from the committed position.
    fn forget_revoked(&mut self) {
        let revoked: HashSet<PartitionId> = self.shared.lock().revoked.drain(..).collect();
        if revoked.is_empty() {
            return;
        }
        let gone = |d: &Delivery| revoked.contains(&(d.topic.clone(), d.partition));
        self.overflow.retain(|d| !gone(d));
        for waiting in self.keys.values_mut() {
            waiting.retain(|d| !gone(d));
        }
    }

    fn take(&mut self, delivery: Delivery) {
        self.shared
            .lock()
            .offsets
            .take(&delivery.topic, delivery.partition, delivery.offset);
        match &delivery.key {
            Some(key) => match self.keys.get_mut(key) {
                // The same key is in flight: keep the per-key order.
                Some(waiting) => waiting.push_back(delivery),
                None => {
                    self.keys.insert(key.clone(), VecDeque::new());
                    self.spawn(delivery);
                }
            },
            None => self.spawn(delivery),
        }
    }

    fn spawn(&mut self, delivery: Delivery) {
        *self
            .shared
            .lock()
            .running
            .entry((delivery.topic.clone(), delivery.partition))
            .or_default() += 1;
        let done = Done {
            shared: self.shared.clone(),
            consumer: self.consumer.clone(),
            stage: self.ctx.stage.clone(),
            metrics: self.ctx.metrics.clone(),
        };
        self.tasks.spawn(work(self.ctx.clone(), done, delivery));
    }

    fn finished(&mut self, joined: Result<Finished, tokio::task::JoinError>) {
        // Waiting messages of partitions revoked meanwhile must not start.
        self.forget_revoked();
        let f = match joined {
            Ok(f) => f,
            // Only an aborted task ends this way (panics are caught inside); it stays uncommitted.
            Err(e) => {
                tracing::warn!(stage = %self.ctx.stage, error = %e, "stage task ended early");
                return;
            }
        };
        if let Outcome::Done(outcome) = f.outcome {
            let took = f.started.elapsed();
            self.ctx
                .metrics
                .stage_processed(&self.ctx.stage, outcome, took);
            if let Some(limit) = self.limit.finished(took) {
                self.ctx.metrics.stage_limit(&self.ctx.stage, limit);
            }
        }
        if let Some(key) = f.key {
            let next = self.keys.get_mut(&key).and_then(VecDeque::pop_front);
            match next {
                Some(d) if !self.ctx.hand_back.is_cancelled() => self.spawn(d),
                Some(_) => {} // shutting down: handed back, uncommitted
                None => {
                    self.keys.remove(&key);
                }
            }
        }
    }

    /// Stops taking messages; waits for the ones being handled up to the drain deadline.
    async fn drain(&mut self) -> Stopped {
        self.ctx.hand_back.cancel();
        self.overflow.clear();
        let deadline = tokio::time::sleep(self.ctx.options.drain_deadline);
        tokio::pin!(deadline);
        while !self.tasks.is_empty() {
            tokio::select! {
                Some(joined) = self.tasks.join_next() => self.finished(joined),
                () = &mut deadline => {
                    tracing::warn!(stage = %self.ctx.stage, left = self.tasks.len(), "drain deadline passed; handing back");
                    self.tasks.abort_all();
                    while self.tasks.join_next().await.is_some() {}
                }
            }
        }
        match self.in_flight() {
            0 => Stopped::Drained,
            messages => Stopped::HandedBack { messages },
        }
    }
}

/// What a task does when its message is finished (or handed back): records it in the shared
/// progress and stores the partition's new commit position.
struct Done {
    shared: Arc<Shared>,
    consumer: Arc<dyn Source>,
    stage: String,
    metrics: Metrics,
}

impl Done {
    fn record(&self, delivery: &Delivery, outcome: &Outcome) {
        let mut progress = self.shared.lock();
        let partition = (delivery.topic.clone(), delivery.partition);
        if let Some(n) = progress.running.get_mut(&partition) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                progress.running.remove(&partition);
            }
        }
        if matches!(outcome, Outcome::Done(_))
            && let Some(next) =
                progress
                    .offsets
                    .finish(&delivery.topic, delivery.partition, delivery.offset)
            // Stored under the lock: positions of one partition are stored in order.
            && let Err(e) = self.consumer.store(&delivery.topic, delivery.partition, next)
        {
            // The partition was revoked meanwhile: its new owner gets the message again, and
            // effects are idempotent.
            tracing::warn!(stage = %self.stage, error = %e, "could not store offset");
            self.metrics.stage_error(&self.stage, "ack");
        }
        drop(progress);
        self.shared.finished.notify_all();
    }
}

/// The life of one message: attempts, backoff between transient failures, and on giving up the
/// handler's `give_up` and a dead letter. Ends `Done` only when the message's fate is
/// acknowledged.
async fn work<H: Handler>(ctx: Arc<Context<H>>, done: Done, delivery: Delivery) -> Finished {
    let started = Instant::now();
    let outcome = match &delivery.event {
        Ok(event) => attempts(&ctx, &delivery, event).await,
        Err(why) => {
            let err = StageError::bad_input(format!(
                "message {}/{}@{} is not a CloudEvent: {why}",
                delivery.topic, delivery.partition, delivery.offset
            ));
            tracing::warn!(stage = %ctx.stage, error = %err, "malformed message");
            give_up(&ctx, &delivery, None, &err, 1).await
        }
    };
    done.record(&delivery, &outcome);
    Finished {
        key: delivery.key,
        started,
        outcome,
    }
}

async fn attempts<H: Handler>(ctx: &Context<H>, delivery: &Delivery, event: &Event) -> Outcome {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = handle(ctx, event).await;
        let finished = |outputs: Vec<Bound>| async {
            match &ctx.tracker {
                Some(t) => t.done(&ctx.stage, event, &outputs).await.map(|()| outputs),
                None => Ok(outputs),
            }
        };
        let bound = match result.and_then(|outputs| ctx.ports.bind(event, outputs)) {
            Ok(outputs) => finished(outputs).await,
            Err(err) => Err(err),
        };
        let err = match bound {
            Ok(outputs) => match publish(ctx, outputs).await {
                Published::All => return Outcome::Done("ok"),
                Published::HandedBack => return Outcome::HandedBack,
                // Refused for good: retrying the handler would not change that.
                Published::Refused(err) => {
                    tracing::warn!(stage = %ctx.stage, id = event.id(), attempt, error = %err, "giving up");
                    return give_up(ctx, delivery, Some(event), &err, attempt).await;
                }
            },
            Err(err) => err,
        };
        if err.class == ErrorClass::Transient && attempt < ctx.options.max_attempts {
            let wait = ctx.options.retry.backoff(attempt - 1);
            tracing::warn!(stage = %ctx.stage, id = event.id(), attempt, error = %err, ?wait, "retrying");
            ctx.metrics.stage_error(&ctx.stage, "retry");
            if !pause(wait, &ctx.hand_back).await {
                return Outcome::HandedBack;
            }
            continue;
        }
        tracing::warn!(stage = %ctx.stage, id = event.id(), attempt, error = %err, "giving up");
        return give_up(ctx, delivery, Some(event), &err, attempt).await;
    }
}

/// Runs the handler on `event` (a panic is a permanent error); the tracker hears that the
/// stage is running on it once it has taken `RUNNING_AFTER`.
async fn handle<H: Handler>(ctx: &Context<H>, event: &Event) -> Result<Vec<Output>, StageError> {
    let handling = async {
        AssertUnwindSafe(ctx.handler.handle(event))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                Err(StageError::permanent(format!(
                    "the stage panicked: {}",
                    panic_text(&panic)
                )))
            })
    };
    let Some(tracker) = &ctx.tracker else {
        return handling.await;
    };
    tokio::pin!(handling);
    tokio::select! {
        biased;
        result = &mut handling => result,
        () = tokio::time::sleep(RUNNING_AFTER) => {
            let (said, result) = tokio::join!(tracker.running(&ctx.stage, event), handling);
            if let Err(e) = said {
                // Only what the status shows meanwhile: done or failed is recorded after.
                tracing::warn!(stage = %ctx.stage, id = event.id(), error = %e, "could not record a running message");
                ctx.metrics.stage_error(&ctx.stage, "track");
            }
            result
        }
    }
}

enum Published {
    All,
    HandedBack,
    Refused(StageError),
}

/// Publishes a message's outputs and waits for every acknowledgement. What the broker could not
/// take is published again with backoff, without running the handler again, until it is taken,
/// refused for good, or the stage hands its work back.
async fn publish<H: Handler>(ctx: &Context<H>, outputs: Vec<Bound>) -> Published {
    let mut pending = outputs;
    let mut tries = 0;
    loop {
        let sent = futures::future::join_all(
            pending
                .iter()
                .map(|o| ctx.sink.publish(&o.topic, &o.key, o.event.clone())),
        )
        .await;
        let mut failed = Vec::new();
        for (output, result) in pending.into_iter().zip(sent) {
            match result {
                Ok(()) => ctx.metrics.stage_output(&ctx.stage, &output.port),
                Err(e) if e.is_transient() => {
                    tracing::warn!(stage = %ctx.stage, topic = output.topic, error = %e, "could not publish an output; trying again");
                    failed.push(output);
                }
                Err(e) => {
                    return Published::Refused(StageError::permanent(format!(
                        "publishing on `{}` (port `{}`): {e}",
                        output.topic, output.port
                    )));
                }
            }
        }
        if failed.is_empty() {
            return Published::All;
        }
        ctx.metrics.stage_error(&ctx.stage, "publish");
        if !pause(ctx.options.retry.backoff(tries), &ctx.hand_back).await {
            return Published::HandedBack;
        }
        tries += 1;
        pending = failed;
    }
}

/// Records the failure through the handler, then publishes the dead letter; each step is retried
/// until it succeeds, since the message may not be committed before both are acknowledged.
async fn give_up<H: Handler>(
    ctx: &Context<H>,
    delivery: &Delivery,
    event: Option<&Event>,
    err: &StageError,
    attempts: u32,
) -> Outcome {
    let mut tries = 0;
    loop {
        let tracked = match (&ctx.tracker, event) {
            (Some(t), Some(event)) => t.failed(&ctx.stage, event, err).await,
            _ => Ok(()),
        };
        let recorded = match tracked {
            Ok(()) => {
                AssertUnwindSafe(ctx.handler.give_up(event, err))
                    .catch_unwind()
                    .await
            }
            Err(e) => Ok(Err(e)),
        };
        match recorded {
            Ok(Ok(())) => break,
            Ok(Err(e)) => {
                tracing::error!(stage = %ctx.stage, error = %e, "could not record a failure")
            }
            Err(panic) => {
                tracing::error!(stage = %ctx.stage, panic = panic_text(&panic), "recording a failure panicked")
            }
        }
        ctx.metrics.stage_error(&ctx.stage, "give_up");
        if !pause(ctx.options.retry.backoff(tries), &ctx.hand_back).await {
            return Outcome::HandedBack;
        }
        tries += 1;
    }
    let letter = DeadLetter {
        stage: ctx.stage.clone(),
        error_class: err.class.as_str().to_owned(),
        error: err.message.clone(),
        attempts,
        failed_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        source: MessageSource {
            topic: delivery.topic.clone(),
            partition: delivery.partition,
            offset: delivery.offset,
            key: delivery.key.clone(),
        },
        event: event.and_then(|e| serde_json::to_value(e).ok()),
        raw: delivery.raw.clone(),
    };
    let mut tries = 0;
    loop {
        let event = match mediaflow_events::encode(&letter, ctx.sink.source()) {
            Ok(event) => event,
            Err(e) => {
                // Our own record failed to serialize: nothing a retry would change.
                tracing::error!(stage = %ctx.stage, error = %e, "could not encode a dead letter");
                return Outcome::Done(err.class.as_str());
            }
        };
        match ctx
            .sink
            .publish(&ctx.dead_letters, &letter.subject(), event)
            .await
        {
            Ok(_) => break,
            Err(e) => {
                tracing::error!(stage = %ctx.stage, error = %e, "could not publish a dead letter")
            }
        }
        ctx.metrics.stage_error(&ctx.stage, "dead_letter");
        if !pause(ctx.options.retry.backoff(tries), &ctx.hand_back).await {
            return Outcome::HandedBack;
        }
        tries += 1;
    }
    ctx.metrics.dead_lettered(&ctx.stage, err.class.as_str());
    Outcome::Done(err.class.as_str())
}

/// Waits `wait`; false if the stage is handing work back first.
async fn pause(wait: Duration, hand_back: &CancellationToken) -> bool {
    tokio::select! {
        () = hand_back.cancelled() => false,
        () = tokio::time::sleep(wait) => true,
    }
}

pub(crate) fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}
