//! The consume loop without a broker: an in-memory source and sink, a scripted handler, and
//! paused time, so ordering, retries, dead letters, offset storage, pausing and draining are
//! proven cheaply and exactly.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudevents::{AttributesReader, Event, EventBuilder, EventBuilderV10};
use futures::future::BoxFuture;
use mediaflow_bus::{BusError, Delivery};
use mediaflow_telemetry::Metrics;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{
    Bound, Handler, Output, Ports, RUNNING_AFTER, RetryPolicy, Sink, Source, StageError,
    StageOptions, StageProbe, StageRun, Stopped, Tracker, run_stage,
};

#[derive(Default)]
struct MemState {
    queue: VecDeque<Delivery>,
    paused: bool,
    pauses: usize,
    resumes: usize,
    /// Every position stored, in order.
    stored: Vec<(i32, i64)>,
    closed: bool,
}

/// A source holding its messages in memory; fetching stops while paused.
#[derive(Default)]
struct Memory {
    state: Mutex<MemState>,
    more: Notify,
}

impl Memory {
    fn with(messages: Vec<Delivery>) -> Arc<Self> {
        let m = Arc::new(Self::default());
        m.lock().queue.extend(messages);
        m
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap()
    }

    /// The last position stored per partition.
    fn positions(&self) -> BTreeMap<i32, i64> {
        self.lock().stored.iter().copied().collect()
    }
}

impl Source for Arc<Memory> {
    fn group(&self) -> &str {
        "memory"
    }
    fn recv(&self) -> BoxFuture<'_, Result<Delivery, BusError>> {
        Box::pin(async move {
            loop {
                {
                    let mut s = self.lock();
                    if !s.paused
                        && let Some(d) = s.queue.pop_front()
                    {
                        return Ok(d);
                    }
                }
                self.more.notified().await;
            }
        })
    }
    fn store(&self, _topic: &str, partition: i32, next: i64) -> Result<(), BusError> {
        self.lock().stored.push((partition, next));
        Ok(())
    }
    fn pause_all(&self) -> Result<(), BusError> {
        let mut s = self.lock();
        s.paused = true;
        s.pauses += 1;
        Ok(())
    }
    fn resume_all(&self) -> Result<(), BusError> {
        let mut s = self.lock();
        s.paused = false;
        s.resumes += 1;
        drop(s);
        self.more.notify_one();
        Ok(())
    }
    fn assignment(&self) -> Result<Vec<(String, i32)>, BusError> {
        Ok(vec![("in".into(), 0)])
    }
    fn close(&self) -> Result<(), BusError> {
        self.lock().closed = true;
        Ok(())
    }
}

/// A sink keeping what it is given; it can refuse (`refusals` times, as a broker that is down
/// would, or for good on `refused_topic`).
#[derive(Default)]
struct Kept {
    kept: Mutex<Vec<(String, Event)>>,
    /// Publishes refused so far, and how many more to refuse.
    refused: Mutex<(u32, u32)>,
    refused_topic: Option<String>,
    /// How many positions the source had stored when each event was taken.
    stored_before: Mutex<Vec<usize>>,
    source: Mutex<Option<Arc<Memory>>>,
    count: tokio::sync::watch::Sender<usize>,
}

impl Kept {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Event)>> {
        self.kept.lock().unwrap()
    }

    /// Waits until it has taken `n` events.
    async fn taken(&self, n: usize) {
        let mut count = self.count.subscribe();
        count.wait_for(|c| *c >= n).await.unwrap();
    }

    /// The events it took on `topic`.
    fn on(&self, topic: &str) -> Vec<Event> {
        self.lock()
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, e)| e.clone())
            .collect()
    }
}

impl Sink for Kept {
    fn source(&self) -> &str {
        "/test"
    }
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        _key: &'a str,
        event: Event,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        let result = (|| {
            if self.refused_topic.as_deref() == Some(topic) {
                return Err(BusError::Encode("too large".into()));
            }
            let mut refused = self.refused.lock().unwrap();
            if refused.1 > 0 {
                refused.1 -= 1;
                refused.0 += 1;
                return Err(BusError::TopicsMissing {
                    missing: vec![topic.to_owned()],
                    waited_ms: 0,
                });
            }
            drop(refused);
            let stored = self
                .source
                .lock()
                .unwrap()
                .as_ref()
                .map_or(0, |s| s.lock().stored.len());
            self.stored_before.lock().unwrap().push(stored);
            let mut kept = self.lock();
            kept.push((topic.to_owned(), event));
            self.count.send_replace(kept.len());
            Ok(())
        })();
        Box::pin(async move { result })
    }
}

/// What the scripted handler does with a message: wait, then fail `fails` times with `class`.
#[derive(Clone, Copy, Default)]
struct Script {
    millis: u64,
    fails: u32,
    permanent: bool,
    /// Events it produces on success, on port `port` (`out` when unset).
    outputs: usize,
    port: Option<&'static str>,
}

/// Runs each message as its script says; tells the test when one starts and when it succeeds.
struct Scripted {
    scripts: HashMap<String, Script>,
    attempts: Mutex<HashMap<String, u32>>,
    finished: mpsc::UnboundedSender<String>,
    started: mpsc::UnboundedSender<String>,
}

impl Handler for Scripted {
    async fn handle(&self, event: &Event) -> Result<Vec<Output>, StageError> {
        let id = event.id().to_owned();
        let script = self.scripts.get(&id).copied().unwrap_or_default();
        let attempt = {
            let mut a = self.attempts.lock().unwrap();
            let n = a.entry(id.clone()).or_default();
            *n += 1;
            *n
        };
        let _ = self.started.send(id.clone());
        tokio::time::sleep(Duration::from_millis(script.millis)).await;
        if attempt <= script.fails {
            return Err(if script.permanent {
                StageError::permanent(format!("{id} is broken"))
            } else {
                StageError::transient(format!("{id} failed, try again"))
            });
        }
        let outputs = (0..script.outputs)
            .map(|n| {
                Output::json(
                    script.port.unwrap_or("out"),
                    "test.out",
                    &id,
                    serde_json::json!({ "n": n }),
                )
            })
            .collect::<Result<_, _>>()?;
        let _ = self.finished.send(id);
        Ok(outputs)
    }

    async fn give_up(&self, _event: Option<&Event>, _error: &StageError) -> Result<(), StageError> {
        Ok(())
    }
}

fn delivery(offset: i64, key: &str) -> Delivery {
    let event = EventBuilderV10::new()
        .id(format!("m{offset}"))
        .ty("test")
        .source("/test")
        .build()
        .unwrap();
    Delivery {
        topic: "in".into(),
        partition: 0,
        offset,
        key: Some(key.to_owned()),
        event: Ok(event),
        raw: None,
    }
}

struct Run {
    source: Arc<Memory>,
    sink: Arc<Kept>,
    shutdown: CancellationToken,
    finished: mpsc::UnboundedReceiver<String>,
    started: mpsc::UnboundedReceiver<String>,
    stage: tokio::task::JoinHandle<Result<Stopped, BusError>>,
    handler: Arc<Scripted>,
}

fn start(messages: Vec<Delivery>, scripts: &[(&str, Script)], options: StageOptions) -> Run {
    start_with(messages, scripts, options, Kept::default(), None)
}

/// A tracker writing down what it is told, with how many events the sink had taken by then.
#[derive(Default)]
struct Journal {
    sink: Mutex<Option<Arc<Kept>>>,
    entries: Mutex<Vec<String>>,
}

impl Journal {
    fn note(&self, what: String) {
        let taken = self
            .sink
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |s| s.on("t.out").len());
        self.entries
            .lock()
            .unwrap()
            .push(format!("{what} ({taken} published)"));
    }
}

impl Tracker for Journal {
    fn running<'a>(
        &'a self,
        stage: &'a str,
        input: &'a Event,
    ) -> BoxFuture<'a, Result<(), StageError>> {
        self.note(format!("{stage} running {}", input.id()));
        Box::pin(async { Ok(()) })
    }
    fn queued<'a>(&'a self, outputs: &'a [Bound]) -> BoxFuture<'a, Result<(), StageError>> {
        let topics: Vec<&str> = outputs.iter().map(|o| o.topic.as_str()).collect();
        self.note(format!("queued on {}", topics.join(",")));
        Box::pin(async { Ok(()) })
    }
    fn done<'a>(
        &'a self,
        stage: &'a str,
        input: &'a Event,
        outputs: &'a [Bound],
    ) -> BoxFuture<'a, Result<(), StageError>> {
        let topics: Vec<&str> = outputs.iter().map(|o| o.topic.as_str()).collect();
        self.note(format!(
            "{stage} done {}, queued on [{}]",
            input.id(),
            topics.join(",")
        ));
        Box::pin(async { Ok(()) })
    }
    fn failed<'a>(
        &'a self,
        stage: &'a str,
        input: &'a Event,
        error: &'a StageError,
    ) -> BoxFuture<'a, Result<(), StageError>> {
        self.note(format!("{stage} failed {}: {}", input.id(), error.message));
        Box::pin(async { Ok(()) })
    }
}

fn start_with(
    messages: Vec<Delivery>,
    scripts: &[(&str, Script)],
    options: StageOptions,
    sink: Kept,
    tracker: Option<Arc<Journal>>,
) -> Run {
    let (finished_tx, finished) = mpsc::unbounded_channel();
    let (started_tx, started) = mpsc::unbounded_channel();
    let handler = Arc::new(Scripted {
        scripts: scripts
            .iter()
            .map(|(id, s)| ((*id).to_owned(), *s))
            .collect(),
        attempts: Mutex::default(),
        finished: finished_tx,
        started: started_tx,
    });
    let source = Memory::with(messages);
    *sink.source.lock().unwrap() = Some(source.clone());
    let sink = Arc::new(sink);
    if let Some(t) = &tracker {
        *t.sink.lock().unwrap() = Some(sink.clone());
    }
    let shutdown = CancellationToken::new();
    let run = StageRun {
        name: "test".into(),
        handler: handler.clone(),
        sink: sink.clone(),
        ports: Ports::new(
            "test",
            1,
            BTreeMap::from([("out".to_owned(), "t.out".to_owned())]),
        ),
        dead_letters: "dead-letters".into(),
        tracker: tracker.map(|t| t as Arc<dyn Tracker>),
        options,
        metrics: Metrics::new(),
        probe: StageProbe::new(),
    };
    let stage = {
        let (source, shutdown) = (source.clone(), shutdown.clone());
        tokio::spawn(async move { run_stage(run, |_| Ok(source), shutdown).await })
    };
    Run {
        source,
        sink,
        shutdown,
        finished,
        started,
        stage,
        handler,
    }
}

fn options() -> StageOptions {
    StageOptions {
        concurrency: 4,
        adaptive: false,
        max_attempts: 5,
        retry: RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        },
        drain_deadline: Duration::from_secs(2),
    }
}

impl Run {
    /// Waits for `n` messages to succeed; their ids in order.
    async fn finished(&mut self, n: usize) -> Vec<String> {
        let mut ids = Vec::new();
        while ids.len() < n {
            ids.push(self.finished.recv().await.unwrap());
        }
        ids
    }

    async fn stop(self) -> (Stopped, Arc<Memory>, Arc<Kept>) {
        self.shutdown.cancel();
        let stopped = self.stage.await.unwrap().unwrap();
        (stopped, self.source, self.sink)
    }
}

#[tokio::test(start_paused = true)]
async fn the_position_moves_only_past_messages_that_are_all_finished() {
    let messages = (0..5).map(|o| delivery(o, &format!("k{o}"))).collect();
    let slow = Script {
        millis: 300,
        ..Script::default()
    };
    let mut run = start(messages, &[("m0", slow)], options());
    let order = run.finished(5).await;
    assert_eq!(order.last().map(String::as_str), Some("m0"), "{order:?}");
    let (stopped, source, _) = run.stop().await;
    assert_eq!(stopped, Stopped::Drained);
    // m1..m4 finished first, but nothing could be stored past the unfinished m0; then all at
    // once.
    assert_eq!(source.lock().stored, vec![(0, 5)]);
    assert!(source.lock().closed);
}

#[tokio::test(start_paused = true)]
async fn messages_with_one_key_run_one_after_another_in_order() {
    let messages = (0..4).map(|o| delivery(o, "same")).collect();
    // Later messages are quicker: run at once, they would finish first.
    let scripts: Vec<(String, Script)> = (0..4)
        .map(|o| {
            (
                format!("m{o}"),
                Script {
                    millis: 40 - 10 * o,
                    ..Script::default()
                },
            )
        })
        .collect();
    let scripts: Vec<(&str, Script)> = scripts.iter().map(|(id, s)| (id.as_str(), *s)).collect();
    let mut run = start(messages, &scripts, options());
    assert_eq!(run.finished(4).await, ["m0", "m1", "m2", "m3"]);
    let (_, source, _) = run.stop().await;
    assert_eq!(source.positions().get(&0), Some(&4));
    // Stored in order, one message at a time.
    assert_eq!(source.lock().stored, vec![(0, 1), (0, 2), (0, 3), (0, 4)]);
}

#[tokio::test(start_paused = true)]
async fn a_transient_failure_is_retried_while_the_partition_flows_on() {
    let messages = (0..3).map(|o| delivery(o, &format!("k{o}"))).collect();
    let flaky = Script {
        millis: 0,
        fails: 2,
        permanent: false,
        ..Script::default()
    };
    let mut run = start(messages, &[("m0", flaky)], options());
    let order = run.finished(3).await;
    assert_eq!(order, ["m1", "m2", "m0"]);
    assert_eq!(run.handler.attempts.lock().unwrap().get("m0"), Some(&3));
    let (_, source, sink) = run.stop().await;
    assert_eq!(source.positions().get(&0), Some(&3));
    assert!(sink.lock().is_empty(), "nothing dead-lettered");
}

#[tokio::test(start_paused = true)]
async fn a_permanent_failure_is_dead_lettered_once_and_passed() {
    let messages = (0..2).map(|o| delivery(o, &format!("k{o}"))).collect();
    let broken = Script {
        millis: 0,
        fails: u32::MAX,
        permanent: true,
        ..Script::default()
    };
    let mut run = start(messages, &[("m0", broken)], options());
    assert_eq!(run.finished(1).await, ["m1"]);
    // The dead letter is published before m0 counts as finished; the position then passes it.
    let (_, source, sink) = run.stop().await;
    assert_eq!(source.positions().get(&0), Some(&2));
    assert_eq!(run_attempts(&sink), 1);
    let letters = sink.lock();
    assert_eq!(letters[0].0, "dead-letters");
    let letter: mediaflow_events::DeadLetter = mediaflow_events::decode(&letters[0].1).unwrap();
    assert_eq!(
        (letter.error_class.as_str(), letter.attempts),
        ("permanent", 1)
    );
    assert_eq!(letter.source.offset, 0);
}

fn run_attempts(sink: &Kept) -> usize {
    sink.lock().len()
}

#[tokio::test(start_paused = true)]
async fn a_transient_failure_that_lasts_is_dead_lettered_after_max_attempts() {
    let messages = vec![delivery(0, "k")];
    let down = Script {
        millis: 0,
        fails: u32::MAX,
        permanent: false,
        ..Script::default()
    };
    let mut run = start(messages, &[("m0", down)], options());
    // Attempts run with backoff between them; wait until the last one started.
    for _ in 0..5 {
        run.started.recv().await.unwrap();
    }
    let (_, source, sink) = run.stop().await;
    let letters = sink.lock();
    let letter: mediaflow_events::DeadLetter = mediaflow_events::decode(&letters[0].1).unwrap();
    assert_eq!(
        (letter.error_class.as_str(), letter.attempts),
        ("transient", 5)
    );
    assert_eq!(source.positions().get(&0), Some(&1));
}

#[tokio::test(start_paused = true)]
async fn the_drain_deadline_hands_back_what_outlasts_it() {
    let messages = vec![delivery(0, "a"), delivery(1, "b")];
    let long = Script {
        millis: 60_000,
        ..Script::default()
    };
    let mut run = start(messages, &[("m0", long)], options());
    assert_eq!(run.finished(1).await, ["m1"]);
    let (stopped, source, _) = run.stop().await;
    assert_eq!(stopped, Stopped::HandedBack { messages: 1 });
    // m1 finished, but the position may not pass the unfinished m0.
    assert!(source.positions().is_empty(), "{:?}", source.lock().stored);
}

fn same_length(n: i64, millis: u64) -> Vec<(String, Script)> {
    (0..n)
        .map(|o| {
            (
                format!("m{o}"),
                Script {
                    millis,
                    ..Script::default()
                },
            )
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn at_capacity_with_quick_messages_it_waits_without_pausing_fetching() {
    let messages = (0..6).map(|o| delivery(o, &format!("k{o}"))).collect();
    let scripts = same_length(6, 50);
    let scripts: Vec<(&str, Script)> = scripts.iter().map(|(id, s)| (id.as_str(), *s)).collect();
    let options = StageOptions {
        concurrency: 2,
        ..options()
    };
    let mut run = start(messages, &scripts, options);
    run.finished(6).await;
    let (_, source, _) = run.stop().await;
    let s = source.lock();
    // A slot frees every 50 ms: pausing (and refetching) would only slow it down.
    assert_eq!((s.pauses, s.resumes), (0, 0));
    assert_eq!(s.stored.last(), Some(&(0, 6)));
}

#[tokio::test(start_paused = true)]
async fn full_with_long_jobs_it_pauses_fetching_and_resumes_when_there_is_room() {
    let messages = (0..6).map(|o| delivery(o, &format!("k{o}"))).collect();
    let scripts = same_length(6, 5_000);
    let scripts: Vec<(&str, Script)> = scripts.iter().map(|(id, s)| (id.as_str(), *s)).collect();
    let options = StageOptions {
        concurrency: 2,
        drain_deadline: Duration::from_secs(10),
        ..options()
    };
    let mut run = start(messages, &scripts, options);
    run.finished(6).await;
    let (_, source, _) = run.stop().await;
    let s = source.lock();
    assert!(
        s.pauses >= 1 && s.resumes >= 1,
        "pauses {} resumes {}",
        s.pauses,
        s.resumes
    );
    assert_eq!(s.stored.last(), Some(&(0, 6)));
}

#[tokio::test(start_paused = true)]
async fn outputs_are_acknowledged_before_the_position_moves_and_not_made_twice() {
    let two = Script {
        outputs: 2,
        ..Script::default()
    };
    // The broker refuses the first three publishes (down, say): they are published again, the
    // handler is not run again, and the position waits for both acknowledgements.
    let sink = Kept {
        refused: Mutex::new((0, 3)),
        ..Kept::default()
    };
    let mut run = start_with(
        vec![delivery(0, "k")],
        &[("m0", two)],
        options(),
        sink,
        None,
    );
    run.finished(1).await;
    run.sink.taken(2).await;
    let (stopped, source, sink) = run.stop().await;
    assert_eq!(stopped, Stopped::Drained);
    assert_eq!(sink.refused.lock().unwrap().0, 3);
    assert_eq!(sink.on("t.out").len(), 2);
    assert_eq!(*sink.stored_before.lock().unwrap(), [0, 0]);
    assert_eq!(source.positions().get(&0), Some(&1));
}

#[tokio::test(start_paused = true)]
async fn a_redelivered_message_makes_outputs_with_the_same_ids() {
    let three = Script {
        outputs: 3,
        ..Script::default()
    };
    let mut ids = Vec::new();
    for _ in 0..2 {
        let run = start(vec![delivery(0, "k")], &[("m0", three)], options());
        run.sink.taken(3).await;
        let (_, _, sink) = run.stop().await;
        let mut these: Vec<String> = sink.on("t.out").iter().map(|e| e.id().to_owned()).collect();
        these.sort();
        ids.push(these);
    }
    assert_eq!(ids[0], ids[1]);
    assert_eq!(
        ids[0]
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len(),
        3
    );
}

#[tokio::test(start_paused = true)]
async fn an_output_on_an_unbound_port_or_refused_for_good_is_dead_lettered_once() {
    for (script, sink) in [
        (
            Script {
                outputs: 1,
                port: Some("nowhere"),
                ..Script::default()
            },
            Kept::default(),
        ),
        (
            Script {
                outputs: 1,
                ..Script::default()
            },
            Kept {
                refused_topic: Some("t.out".into()),
                ..Kept::default()
            },
        ),
    ] {
        let run = start_with(
            vec![delivery(0, "k")],
            &[("m0", script)],
            options(),
            sink,
            None,
        );
        run.sink.taken(1).await;
        let handler = run.handler.clone();
        let (_, source, sink) = run.stop().await;
        assert_eq!(handler.attempts.lock().unwrap().get("m0"), Some(&1));
        let letters = sink.on("dead-letters");
        assert_eq!(letters.len(), 1);
        let letter: mediaflow_events::DeadLetter = mediaflow_events::decode(&letters[0]).unwrap();
        assert_eq!(letter.error_class, "permanent");
        assert!(
            letter.error.contains("nowhere") || letter.error.contains("t.out"),
            "{}",
            letter.error
        );
        assert!(sink.on("t.out").is_empty());
        assert_eq!(source.positions().get(&0), Some(&1));
    }
}

#[tokio::test(start_paused = true)]
async fn the_tracker_hears_done_with_the_outputs_queued_before_publishing_or_failed() {
    let journal = Arc::new(Journal::default());
    let quick = Script {
        outputs: 1,
        ..Script::default()
    };
    let slow = Script {
        millis: RUNNING_AFTER.as_millis() as u64 * 2,
        outputs: 2,
        ..Script::default()
    };
    let broken = Script {
        fails: u32::MAX,
        permanent: true,
        ..Script::default()
    };
    // One key: each is finished before the next starts.
    let run = start_with(
        vec![delivery(0, "a"), delivery(1, "a"), delivery(2, "a")],
        &[("m0", quick), ("m1", slow), ("m2", broken)],
        options(),
        Kept::default(),
        Some(journal.clone()),
    );
    run.sink.taken(4).await;
    let (_, source, _) = run.stop().await;
    assert_eq!(source.positions().get(&0), Some(&3));
    // Quick work goes from queued to done; work that lasts is said to be running meanwhile.
    assert_eq!(
        *journal.entries.lock().unwrap(),
        [
            "test done m0, queued on [t.out] (0 published)",
            "test running m1 (1 published)",
            "test done m1, queued on [t.out,t.out] (1 published)",
            "test failed m2: m2 is broken (3 published)",
        ]
    );
}
