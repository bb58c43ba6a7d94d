//! The process's cores as one budget: stages run their CPU-bound work (decoding, detection,
//! encoding) through `on_cpu`, at most one job per core the process may use, whichever stages
//! the jobs come from.
//!
//! Deployed, a process runs one stage and this is that stage's limit. On one machine
//! (`mediaflow up`) every stage shares the process: a budget per stage would let N stages run
//! N jobs per core, time-sliced, each evicting the others' working sets from the caches.
//!
//! A core that comes free goes to the stage with jobs waiting that has used the cores least
//! (its jobs' time on them; a stage that starts asking again after a pause starts level with
//! the others, not ahead by its pause), each stage's jobs in the order they asked. So a stage
//! of 3 ms jobs never waits behind a queue of another's 200 ms jobs (in one queue for all, the
//! tagging pipeline's cheap branch fell behind its detector and the join's pairs came apart in
//! time), and stages of equal jobs take turns.
//!
//! Each core has a long-lived thread of its own that runs the jobs given that core, so what a
//! job leaves in thread-local state (a detector's loaded classifiers, the allocator's arena,
//! the caches) is there for the next. On tokio's blocking pool the jobs went to whichever of
//! its threads was idle, among those of file and DNS work, each loading its own classifiers.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::StageError;

/// Free cores, and the jobs waiting for one by stage.
struct Budget {
    state: Mutex<Waiting>,
    /// The queue of each core's thread. (A core is held by one job at a time, so a job sent
    /// finds its thread done with the last one, or finishing it.)
    threads: Vec<mpsc::Sender<Job>>,
}

/// A job on a core's thread: the work, then the core handed on and the result handed back.
type Job = Box<dyn FnOnce() + Send>;

struct Waiting {
    /// The cores no job holds, by index.
    free: Vec<usize>,
    /// Every stage that has asked, in the order they first did (ties go to the earlier).
    stages: Vec<Stage>,
    /// The use of the stage given a core last: where a stage that starts asking again starts.
    clock: Duration,
}

struct Stage {
    name: String,
    /// Its jobs' time on the cores, counted from where it last started asking.
    used: Duration,
    jobs: VecDeque<oneshot::Sender<Core>>,
}

/// Core `index`, held while a job of `stage` runs; handed on when dropped.
struct Core {
    budget: Arc<Budget>,
    stage: usize,
    index: usize,
    since: Instant,
}

impl Drop for Core {
    fn drop(&mut self) {
        self.budget
            .release(self.stage, self.index, self.since.elapsed());
    }
}

impl Budget {
    /// A budget of `cores` cores, and their threads (which stop with the budget).
    fn new(cores: usize) -> Arc<Self> {
        let threads = (0..cores)
            .map(|i| {
                let (tx, rx) = mpsc::channel::<Job>();
                std::thread::Builder::new()
                    .name(format!("mediaflow-cpu-{i}"))
                    .spawn(move || {
                        while let Ok(job) = rx.recv() {
                            job();
                        }
                    })
                    .expect("starting a CPU thread");
                tx
            })
            .collect();
        Arc::new(Self {
            state: Mutex::new(Waiting {
                free: (0..cores).rev().collect(),
                stages: Vec::new(),
                clock: Duration::ZERO,
            }),
            threads,
        })
    }

    fn core(self: &Arc<Self>, stage: usize, index: usize) -> Core {
        Core {
            budget: self.clone(),
            stage,
            index,
            since: Instant::now(),
        }
    }

    /// A core for a job of `stage`, once it is its turn.
    async fn acquire(self: &Arc<Self>, stage: &str) -> Core {
        let waiting = {
            let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let i = match w.stages.iter().position(|s| s.name == stage) {
                Some(i) => i,
                None => {
                    w.stages.push(Stage {
                        name: stage.to_owned(),
                        used: Duration::ZERO,
                        jobs: VecDeque::new(),
                    });
                    w.stages.len() - 1
                }
            };
            let clock = w.clock;
            let s = &mut w.stages[i];
            if s.jobs.iter().all(oneshot::Sender::is_closed) {
                s.used = s.used.max(clock);
            }
            if w.stages.iter().all(|s| s.jobs.is_empty())
                && let Some(index) = w.free.pop()
            {
                w.clock = w.stages[i].used;
                return self.core(i, index);
            }
            let (tx, rx) = oneshot::channel();
            w.stages[i].jobs.push_back(tx);
            rx
        };
        match waiting.await {
            Ok(core) => core,
            // Never: a sender is only dropped by handing it a core, or with the budget.
            Err(_) => unreachable!("the CPU budget dropped a waiting job"),
        }
    }

    /// A job of stage `stage` held core `index` for `held`: the core goes to the waiting stage
    /// that has used the cores least.
    fn release(self: &Arc<Self>, stage: usize, index: usize, held: Duration) {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        w.stages[stage].used += held;
        loop {
            let next = w
                .stages
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.jobs.is_empty())
                .min_by_key(|(_, s)| s.used)
                .map(|(i, _)| i);
            let Some(i) = next else {
                w.free.push(index);
                return;
            };
            let Some(job) = w.stages[i].jobs.pop_front() else {
                continue;
            };
            // A job whose caller stopped waiting has dropped its receiver.
            if job.is_closed() {
                continue;
            }
            w.clock = w.stages[i].used;
            if let Err(core) = job.send(self.core(i, index)) {
                // Dropping it would release it again, under this lock.
                std::mem::forget(core);
                continue;
            }
            return;
        }
    }
}

/// One budget for the process: a core per CPU it may run on (its affinity, as `taskset` sets
/// it).
fn budget() -> &'static Arc<Budget> {
    static BUDGET: OnceLock<Arc<Budget>> = OnceLock::new();
    BUDGET.get_or_init(|| {
        Budget::new(std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
    })
}

/// Runs `work` for `stage` on a core's thread once a core is free for it and it is the
/// stage's turn.
pub async fn on_cpu<T: Send + 'static>(
    stage: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StageError> {
    run_on(budget(), stage, work).await
}

async fn run_on<T: Send + 'static>(
    budget: &Arc<Budget>,
    stage: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StageError> {
    let core = budget.acquire(stage).await;
    let thread = &budget.threads[core.index];
    let (tx, rx) = oneshot::channel();
    // The core is held until the work is done, even if the caller stops waiting.
    let job: Job = Box::new(move || {
        let result = std::panic::catch_unwind(AssertUnwindSafe(work));
        drop(core);
        let _ = tx.send(result);
    });
    if thread.send(job).is_err() {
        return Err(StageError::permanent("CPU task failed: its thread stopped"));
    }
    match rx.await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(panic)) => Err(StageError::permanent(format!(
            "CPU task panicked: {}",
            crate::stage::panic_text(&panic)
        ))),
        Err(_) => Err(StageError::permanent("CPU task failed: its thread stopped")),
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};

    use futures::poll;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn jobs_from_anywhere_run_at_most_one_per_core() {
        let cores = 2;
        let budget = Budget::new(cores);
        // Jobs meet in pairs: a budget of fewer cores would never let a pair meet.
        let meet = Arc::new(Barrier::new(cores));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let jobs: Vec<_> = (0..cores * 4)
            .map(|n| {
                let (budget, meet) = (budget.clone(), meet.clone());
                let (running, most) = (running.clone(), most.clone());
                tokio::spawn(async move {
                    run_on(&budget, if n % 2 == 0 { "a" } else { "b" }, move || {
                        most.fetch_max(
                            running.fetch_add(1, Ordering::SeqCst) + 1,
                            Ordering::SeqCst,
                        );
                        meet.wait();
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
                })
            })
            .collect();
        for job in jobs {
            job.await.unwrap().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), cores);
    }

    #[tokio::test]
    async fn a_core_runs_its_jobs_on_one_thread_and_survives_a_panic() {
        let budget = Budget::new(1);
        let thread = || std::thread::current().id();
        let first = run_on(&budget, "a", thread).await.unwrap();
        let err = run_on(&budget, "b", || panic!("bad pixels"))
            .await
            .expect_err("a panic is an error");
        assert!(err.message.contains("bad pixels"), "{}", err.message);
        // The core came back, and its thread lives on.
        let second = run_on(&budget, "a", thread).await.unwrap();
        assert_eq!(first, second);
        assert_ne!(first, std::thread::current().id());
    }

    type Waiter<'a> = (&'static str, Pin<Box<dyn Future<Output = Core> + 'a>>);

    /// The stage of the one waiter that has a core now; that core.
    async fn next<'a>(waiting: &mut Vec<Waiter<'a>>) -> (&'static str, Core) {
        let mut got = None;
        for (i, (_, job)) in waiting.iter_mut().enumerate() {
            if let std::task::Poll::Ready(core) = poll!(job.as_mut()) {
                assert!(got.is_none(), "one core, one job");
                got = Some((i, core));
            }
        }
        let (i, core) = got.expect("a job got the free core");
        (waiting.remove(i).0, core)
    }

    #[tokio::test(start_paused = true)]
    async fn a_free_core_goes_to_the_stage_that_used_the_cores_least() {
        let budget = Budget::new(1);
        let mut core = budget.acquire("slow").await;
        let mut waiting: Vec<Waiter<'_>> = Vec::new();
        for stage in ["slow", "slow", "other", "quick", "quick", "quick", "gone"] {
            let mut job = Box::pin(budget.acquire(stage));
            assert!(poll!(job.as_mut()).is_pending(), "the only core is taken");
            waiting.push((stage, job));
        }
        // The last stage's job stops waiting: it is passed over.
        waiting.pop();
        let held = |stage: &str| match stage {
            "quick" => Duration::from_millis(3),
            _ => Duration::from_millis(200),
        };
        let mut stage = "slow";
        let mut order = Vec::new();
        while !waiting.is_empty() {
            tokio::time::advance(held(stage)).await;
            drop(core);
            (stage, core) = next(&mut waiting).await;
            order.push(stage);
        }
        // The quick stage's jobs go first, as long as it has used less; the slow stages take
        // turns.
        assert_eq!(order, ["other", "quick", "quick", "quick", "slow", "slow"]);

        // A stage that starts asking again after a pause is not owed its pause: it starts
        // level with the stage served last, and the two take turns.
        tokio::time::advance(Duration::from_millis(200)).await;
        let mut waiting: Vec<Waiter<'_>> = Vec::new();
        for stage in ["slow", "quick"] {
            let mut job = Box::pin(budget.acquire(stage));
            assert!(poll!(job.as_mut()).is_pending());
            waiting.push((stage, job));
        }
        drop(core);
        let (first, core) = next(&mut waiting).await;
        assert_eq!(first, "quick", "level, and it used less since");
        drop(core);
        let (second, core) = next(&mut waiting).await;
        assert_eq!(second, "slow");
        drop(core);
        // Nobody waits: the core is free again.
        let again = budget.acquire("quick");
        tokio::pin!(again);
        assert!(poll!(again.as_mut()).is_ready());
    }
}
