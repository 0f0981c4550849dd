//! A fork-join pool for the CPU backend's matmuls, whose idle workers spin before they
//! sleep.
//!
//! A decode step of a small model is ~150 parallel matmuls of 20–100 µs each. rayon parks
//! an idle worker soon after its last job, and on the VMs measured waking a parked thread
//! (futex, context switch) costs ~50 µs: a matmul handed from one thread to a sleeping one
//! took 148 µs for 33 µs of work (benches/RESULTS.md). Here idle workers poll for the next
//! job for a while (`SPIN`) before they park, the way llama.cpp's thread pool does, so
//! back-to-back ops in a forward pass hand over in well under a microsecond.
//!
//! The pool has `rayon::current_num_threads() - 1` workers; the calling thread takes part
//! in every job. One job runs at a time (callers queue); a job started from inside a job
//! runs on the calling thread alone.

use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker polls for a new job before it parks.
const SPIN: Duration = Duration::from_millis(2);

/// One job: `n` tasks of a closure that lives on the caller's stack. The caller waits until
/// every task has finished, and a task index is only ever claimed within its range, so no
/// worker calls `f` after `run` returns (late workers find no task left and stop).
///
/// The tasks are split into one contiguous range per thread, each drained in order before
/// its thread helps the others: a thread then streams through one region of a weight
/// matrix (the hardware prefetchers follow it), where tasks dealt out one by one would
/// interleave the threads' reads.
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    ranges: Vec<Range>,
    /// Tasks not yet finished; each thread subtracts what it ran once it has run out.
    pending: AtomicUsize,
    panicked: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

/// A thread's range of tasks: the next unclaimed one and the end. Each range sits alone on
/// its cache lines: the threads claim tasks from their own ranges at the same moment, and
/// with the counters (or a shared count of finished tasks) on one line every claim moved
/// that line between cores. That cost ~15 µs of a 32 µs matmul on 2 threads.
#[repr(align(128))]
struct Range {
    next: AtomicUsize,
    end: usize,
}

// SAFETY: `f` points to a `Sync` closure that outlives every call made through it (above).
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

impl Job {
    fn new(f: *const (dyn Fn(usize) + Sync), n: usize, threads: usize) -> Job {
        let ranges = (0..threads)
            .map(|t| Range {
                next: AtomicUsize::new(n * t / threads),
                end: n * (t + 1) / threads,
            })
            .collect();
        Job {
            f,
            ranges,
            pending: AtomicUsize::new(n),
            panicked: Mutex::new(None),
        }
    }

    /// Claims and runs tasks until none is left: thread `me`'s range first, then the others.
    fn work(&self, me: usize) {
        let k = self.ranges.len();
        let mut ran = 0;
        for range in (0..k).map(|r| &self.ranges[(me + r) % k]) {
            loop {
                let i = range.next.fetch_add(1, Ordering::Relaxed);
                if i >= range.end {
                    break;
                }
                ran += 1;
                // SAFETY: task `i` is claimed once, before the caller stops waiting.
                let f = unsafe { &*self.f };
                if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(i))) {
                    let mut first = self.panicked.lock().unwrap_or_else(|e| e.into_inner());
                    first.get_or_insert(p);
                }
            }
        }
        // After this thread's last call of `f`: the caller stops waiting only then.
        if ran > 0 {
            self.pending.fetch_sub(ran, Ordering::Release);
        }
    }
}

struct Shared {
    /// Bumped when a job is published.
    epoch: AtomicU64,
    current: Mutex<Option<Arc<Job>>>,
    sleepers: AtomicUsize,
    wake: Condvar,
    wake_lock: Mutex<()>,
    /// Set when the pool is dropped: workers exit.
    stop: AtomicBool,
}

pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    /// One job at a time.
    run_lock: Mutex<()>,
}

thread_local! {
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

impl Pool {
    /// The process-wide pool, sized like rayon's global pool when first used.
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| Pool::new(rayon::current_num_threads().saturating_sub(1)))
    }

    fn new(workers: usize) -> Pool {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            current: Mutex::new(None),
            sleepers: AtomicUsize::new(0),
            wake: Condvar::new(),
            wake_lock: Mutex::new(()),
            stop: AtomicBool::new(false),
        });
        for i in 0..workers {
            let s = shared.clone();
            // A pool that cannot start a thread runs jobs with fewer hands, not wrongly.
            let _ = std::thread::Builder::new()
                .name(format!("vellum-cpu-{i}"))
                .spawn(move || worker(&s, i + 1));
        }
        Pool {
            shared,
            workers,
            run_lock: Mutex::new(()),
        }
    }

    /// Runs `f(i)` for every `i` in `0..n`, on the workers and the calling thread.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n == 0 {
            return;
        }
        if n == 1 || self.workers == 0 || IN_JOB.with(Cell::get) {
            (0..n).for_each(f);
            return;
        }
        let _one = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY (lifetime erasure): the job is finished before this function returns.
        let f: *const (dyn Fn(usize) + Sync + '_) = f;
        let f: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        let job = Arc::new(Job::new(f, n, self.workers + 1));
        *self
            .shared
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(job.clone());
        self.shared.announce();
        IN_JOB.with(|j| j.set(true));
        job.work(0);
        IN_JOB.with(|j| j.set(false));
        let mut polls = 0u32;
        while job.pending.load(Ordering::Acquire) != 0 {
            relax(&mut polls);
        }
        *self
            .shared
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        let panicked = job
            .panicked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(p) = panicked {
            resume_unwind(p);
        }
    }

    /// Calls `f` once on each item, spread over the pool (like rayon's
    /// `par_iter_mut().for_each`).
    pub fn for_each_mut<T: Send>(&self, items: &mut [T], f: impl Fn(&mut T) + Sync) {
        let base = SendPtr(items.as_mut_ptr());
        let n = items.len();
        self.run(n, &|i| {
            debug_assert!(i < n);
            // SAFETY: `run` calls each `i < n` exactly once, so the `&mut`s are disjoint.
            f(unsafe { &mut *base.get().add(i) })
        });
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.announce();
    }
}

impl Shared {
    /// Starts a new epoch (a job, or the end) and wakes the parked workers.
    fn announce(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        // SeqCst pairs with the worker's `sleepers` increment before its last epoch check:
        // either it sees the new epoch, or this sees it parked.
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = self.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
    }
}

/// A pointer the pool's closures may share (each task touches its own element).
struct SendPtr<T>(*mut T);
unsafe impl<T: Send> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

/// One step of a busy wait: a pause, and after the first thousand a yield too, so that a
/// descheduled thread holding the awaited task (more threads than cores) gets to run.
fn relax(polls: &mut u32) {
    *polls = polls.wrapping_add(1);
    if *polls < 1024 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

fn worker(s: &Shared, me: usize) {
    let mut seen = s.epoch.load(Ordering::SeqCst);
    loop {
        let idle_since = Instant::now();
        let mut polls = 0u32;
        loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            if s.stop.load(Ordering::Relaxed) {
                return;
            }
            if !(polls + 1).is_multiple_of(1024) || idle_since.elapsed() < SPIN {
                relax(&mut polls);
                continue;
            }
            let guard = s.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            let guard = s
                .wake
                .wait_while(guard, |_| s.epoch.load(Ordering::SeqCst) == seen)
                .unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            drop(guard);
        }
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        let job = s.current.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(job) = job {
            IN_JOB.with(|j| j.set(true));
            job.work(me);
            IN_JOB.with(|j| j.set(false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_whatever_the_pool_size() {
        for workers in [0, 1, 3] {
            let pool = Pool::new(workers);
            for n in [0usize, 1, 2, 7, 100] {
                let mut hits = vec![0u32; n];
                pool.for_each_mut(&mut hits, |h| *h += 1);
                assert!(hits.iter().all(|&h| h == 1), "{workers} workers, {n} tasks");
            }
        }
    }

    #[test]
    fn parked_workers_wake_for_the_next_job() {
        let pool = Pool::new(2);
        std::thread::sleep(SPIN * 3);
        let sum = AtomicUsize::new(0);
        pool.run(64, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.into_inner(), 64 * 63 / 2);
    }

    #[test]
    fn a_task_panic_reaches_the_caller_and_the_pool_still_works() {
        let pool = Pool::new(1);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(8, &|i| assert!(i != 5, "task five"));
        }));
        assert!(r.is_err());
        let mut hits = vec![0u8; 9];
        pool.for_each_mut(&mut hits, |h| *h += 1);
        assert!(hits.iter().all(|&h| h == 1));
    }

    #[test]
    fn a_job_inside_a_job_runs_on_its_thread() {
        let pool = Pool::new(1);
        let count = AtomicUsize::new(0);
        pool.run(4, &|_| {
            pool.run(3, &|_| {
                count.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(count.into_inner(), 12);
    }
}
