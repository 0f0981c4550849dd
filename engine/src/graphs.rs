//! When decode steps are recorded and replayed (CUDA graphs; see `vellum_kernels::graph`).
//!
//! The first decode step of a shape runs op by op: it puts everything the step reads on the
//! device (KV pools, norm weights, scratch grown to size), so that the second, recorded,
//! finds it there. From the second on, steps of that shape replay the recording. A step
//! whose recording fails runs op by op (a recording is a speed-up, never a reason for a step
//! to fail), and the next step of its shape tries again: a failure can be passing (KV pools
//! moved back to the host). A shape that fails `MAX_FAILURES` times runs op by op from then
//! on, with a warning.
//!
//! A decode batch is padded up to one of a few sizes (`vellum_kernels::padded_seqs`) when
//! the backend can record it, whether it is then recorded, replayed or run op by op, so
//! that continuous batching's changing batch sizes replay a few recordings, and a batch's
//! values do not depend on whether its step was replayed.
//!
//! Each recording holds device memory for its replays, mostly its log-probabilities (a
//! SmolLM2 step of 64 sequences: 12.6 MB). Batch sizes and context buckets multiply the
//! shapes, so the recordings share a budget (`DEFAULT_BUDGET`, `StepGraphs::with_budget`):
//! past it, the least recently used go (their shapes are recorded again when they return).

use crate::error::Result;
use std::collections::{HashMap, HashSet};
use std::fmt;
use vellum_kernels::{padded_seqs, Backend, GraphKey, KvLayer, RecordedStep, StepInputs, Tensor};

/// Device memory the recordings may hold together, by default.
pub const DEFAULT_BUDGET: usize = 256 << 20;
/// Failed recordings of a shape before it is no longer tried.
const MAX_FAILURES: u32 = 3;

/// A step's ops over the inputs given (the step's, or them padded), run op by op on the KV
/// cache given.
pub type StepFn<'a> = dyn FnMut(&StepInputs, &mut [KvLayer]) -> Result<StepTensors> + 'a;

/// What a step's ops leave where the backend ran them: the log-probabilities of every row,
/// and their picks when the step picks rows (`StepInputs::targets`).
pub struct StepTensors {
    pub logprobs: Tensor,
    pub picks: Option<Tensor>,
}

impl StepTensors {
    /// What the step brings back: the picks if it picks rows, else the whole rows.
    fn brought_back(&self) -> &Tensor {
        self.picks.as_ref().unwrap_or(&self.logprobs)
    }
}

/// The recordings of one engine's decode steps, by shape.
pub struct StepGraphs {
    recorded: HashMap<GraphKey, Recorded>,
    /// Device memory the recordings may hold together.
    budget: usize,
    /// Counts steps, to find the least recently used recording.
    clock: u64,
    /// Shapes met once: the next step of the shape is recorded.
    seen: HashSet<GraphKey>,
    /// Failed recordings by shape: at `MAX_FAILURES`, the shape runs op by op.
    failures: HashMap<GraphKey, u32>,
    pub stats: GraphStats,
}

/// What the recordings did, since the engine started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Steps recorded (each then ran as a replay).
    pub recorded: u64,
    /// Steps run as a replay of an earlier recording.
    pub replayed: u64,
    /// Steps run op by op (recordings that failed included).
    pub op_by_op: u64,
    /// Recordings that failed.
    pub failed: u64,
    /// Recordings dropped for the budget.
    pub evicted: u64,
}

/// A recording, and the step it last ran.
struct Recorded {
    step: Box<dyn RecordedStep>,
    used: u64,
}

impl Default for StepGraphs {
    fn default() -> Self {
        StepGraphs::with_budget(DEFAULT_BUDGET)
    }
}

impl fmt::Display for GraphStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} recorded, {} replayed, {} steps op by op, {} failed recordings, {} dropped for \
             the memory budget",
            self.recorded, self.replayed, self.op_by_op, self.failed, self.evicted
        )
    }
}

impl StepGraphs {
    /// Recordings holding at most `budget` bytes of device memory together (one recording
    /// is kept whatever its size).
    pub fn with_budget(budget: usize) -> StepGraphs {
        StepGraphs {
            recorded: HashMap::new(),
            budget,
            clock: 0,
            seen: HashSet::new(),
            failures: HashMap::new(),
            stats: GraphStats::default(),
        }
    }

    /// Runs the step (`step`, over `inputs`, padded): as a replay of its shape's recording,
    /// as a new recording, or op by op. Returns what it brings back of `inputs`' rows: the
    /// picks (`[rows, 2]`) if it picks them, else the rows of log-probabilities.
    pub fn run(
        &mut self,
        backend: &dyn Backend,
        inputs: &StepInputs,
        kv: &mut [KvLayer],
        step: &mut StepFn,
    ) -> Result<Vec<f32>> {
        let padded = inputs.padded(padded_seqs(inputs.tokens.len()));
        let padded_inputs = padded.as_ref().map(|p| p.inputs());
        let keyed = padded_inputs.and_then(|p| Some((backend.step_graph_key(&p)?, p)));
        let Some((key, inputs)) = keyed else {
            return self.op_by_op(inputs, kv, step);
        };
        let inputs = &inputs;
        self.clock += 1;
        if let Some(recorded) = self.recorded.get_mut(&key) {
            recorded.used = self.clock;
            if let Some(out) = backend.replay_step(&*recorded.step, inputs, kv)? {
                self.stats.replayed += 1;
                return Ok(out);
            }
            // The KV pools it wrote moved: record the shape again.
            self.recorded.remove(&key);
        }
        let first = self.seen.insert(key);
        let failures = self.failures.get(&key).copied().unwrap_or(0);
        if first || failures >= MAX_FAILURES {
            return self.op_by_op(inputs, kv, step);
        }
        match self.record(backend, key, inputs, kv, step) {
            Ok(out) => Ok(out),
            Err(why) => {
                // Nothing ran while recording: the step runs op by op, and if that fails as
                // well, the recording was not to blame.
                let out = self.op_by_op(inputs, kv, step)?;
                self.stats.failed += 1;
                self.failures.insert(key, failures + 1);
                tracing::debug!("recording a decode step of shape {key:?}: {why}");
                if failures + 1 == MAX_FAILURES {
                    tracing::warn!("decode steps of shape {key:?} run op by op: {why}");
                }
                Ok(out)
            }
        }
    }

    fn record(
        &mut self,
        backend: &dyn Backend,
        key: GraphKey,
        inputs: &StepInputs,
        kv: &mut [KvLayer],
        step: &mut StepFn,
    ) -> Result<Vec<f32>> {
        backend.begin_step_record(key, inputs)?;
        let output = step(inputs, kv);
        let back = output.as_ref().ok().map(StepTensors::brought_back);
        let recorded = backend.end_step_record(back, kv);
        output?;
        let recorded = recorded?;
        let out = backend.replay_step(&*recorded, inputs, kv)?;
        let out = out.ok_or_else(|| {
            crate::EngineError::Kernel(vellum_kernels::KernelError::Unsupported {
                op: "replay step",
                detail: "a step just recorded does not apply to its own inputs".into(),
            })
        })?;
        let used = self.clock;
        self.recorded.insert(
            key,
            Recorded {
                step: recorded,
                used,
            },
        );
        self.stats.recorded += 1;
        self.keep_to_budget();
        Ok(out)
    }

    /// Drops the least recently used recordings while they hold more than the budget, the
    /// last one run excepted.
    fn keep_to_budget(&mut self) {
        let mut held: usize = self.recorded.values().map(|r| r.step.bytes()).sum();
        while held > self.budget && self.recorded.len() > 1 {
            let oldest = self.recorded.iter().min_by_key(|(_, r)| r.used);
            let Some((&key, _)) = oldest else { break };
            if let Some(r) = self.recorded.remove(&key) {
                held -= r.step.bytes();
                self.stats.evicted += 1;
            }
        }
    }

    /// Device memory the recordings hold.
    pub fn bytes(&self) -> usize {
        self.recorded.values().map(|r| r.step.bytes()).sum()
    }

    fn op_by_op(
        &mut self,
        inputs: &StepInputs,
        kv: &mut [KvLayer],
        step: &mut StepFn,
    ) -> Result<Vec<f32>> {
        self.stats.op_by_op += 1;
        let out = step(inputs, kv)?;
        let back = out.brought_back();
        let row = back.len() / inputs.rows.len().max(1);
        Ok(back.first(inputs.returned_rows() * row)?)
    }

    /// Recordings held.
    pub fn len(&self) -> usize {
        self.recorded.len()
    }

    pub fn is_empty(&self) -> bool {
        self.recorded.is_empty()
    }
}
