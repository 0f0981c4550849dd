//! When decode steps are recorded and replayed (CUDA graphs; see `vellum_kernels::graph`).
//!
//! The first decode step of a shape runs op by op: it puts everything the step reads on the
//! device (KV pools, norm weights, scratch grown to size), so that the second, recorded,
//! finds it there. From the second on, steps of that shape replay the recording. A step
//! whose recording fails runs op by op (a recording is a speed-up, never a reason for a step
//! to fail), and the next step of its shape tries again: a failure can be passing (KV pools
//! moved back to the host). A shape that fails `MAX_FAILURES` times runs op by op from then
//! on, with a warning.

use crate::error::Result;
use std::collections::{HashMap, HashSet};
use vellum_kernels::{Backend, GraphKey, KvLayer, RecordedStep, StepInputs, Tensor};

/// Most recordings kept: one per decode batch size and context bucket met, each holding its
/// activations' device memory (about a decode step's, small beside the weights).
const MAX_RECORDED: usize = 128;
/// Failed recordings of a shape before it is no longer tried.
const MAX_FAILURES: u32 = 3;

/// A step's ops, run op by op on the KV cache given; the log-probabilities where the backend
/// left them.
pub type StepFn<'a> = dyn FnMut(&mut [KvLayer]) -> Result<Tensor> + 'a;

/// The recordings of one engine's decode steps, by shape.
#[derive(Default)]
pub struct StepGraphs {
    recorded: HashMap<GraphKey, Box<dyn RecordedStep>>,
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
}

impl std::fmt::Display for GraphStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} recorded, {} replayed, {} steps op by op, {} failed recordings",
            self.recorded, self.replayed, self.op_by_op, self.failed
        )
    }
}

impl StepGraphs {
    /// Runs the step (`step`, over `inputs`): as a replay of its shape's recording, as a
    /// new recording, or op by op. Returns its log-probabilities.
    pub fn run(
        &mut self,
        backend: &dyn Backend,
        inputs: &StepInputs,
        kv: &mut [KvLayer],
        step: &mut StepFn,
    ) -> Result<Vec<f32>> {
        let Some(key) = backend.step_graph_key(inputs) else {
            return self.op_by_op(kv, step);
        };
        if let Some(recorded) = self.recorded.get(&key) {
            if let Some(out) = backend.replay_step(&**recorded, inputs, kv)? {
                self.stats.replayed += 1;
                return Ok(out);
            }
            // The KV pools it wrote moved: record the shape again.
            self.recorded.remove(&key);
        }
        let first = self.seen.insert(key);
        let failures = self.failures.get(&key).copied().unwrap_or(0);
        if first || failures >= MAX_FAILURES || self.recorded.len() >= MAX_RECORDED {
            return self.op_by_op(kv, step);
        }
        match self.record(backend, key, inputs, kv, step) {
            Ok(out) => Ok(out),
            Err(why) => {
                // Nothing ran while recording: the step runs op by op, and if that fails as
                // well, the recording was not to blame.
                let out = self.op_by_op(kv, step)?;
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
        let output = step(kv);
        let recorded = backend.end_step_record(output.as_ref().ok(), kv);
        output?;
        let recorded = recorded?;
        let out = backend.replay_step(&*recorded, inputs, kv)?;
        let out = out.ok_or_else(|| {
            crate::EngineError::Kernel(vellum_kernels::KernelError::Unsupported {
                op: "replay step",
                detail: "a step just recorded does not apply to its own inputs".into(),
            })
        })?;
        self.recorded.insert(key, recorded);
        self.stats.recorded += 1;
        Ok(out)
    }

    fn op_by_op(&mut self, kv: &mut [KvLayer], step: &mut StepFn) -> Result<Vec<f32>> {
        self.stats.op_by_op += 1;
        Ok(step(kv)?.to_vec()?)
    }

    /// Recordings held.
    pub fn len(&self) -> usize {
        self.recorded.len()
    }

    pub fn is_empty(&self) -> bool {
        self.recorded.is_empty()
    }
}
