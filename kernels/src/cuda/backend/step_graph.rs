//! Recorded decode steps on CUDA graphs (see [`crate::graph`]).
//!
//! Recording: the step's input arrays go up first, packed into one buffer; then the runtime
//! captures the ops (nothing runs), while `CudaBackend::array` hands the ops their parts of
//! it ([`Capture::array`]). Every other buffer the recorded launches touch is the
//! model's (weights, KV pools: their owners outlive the recording, and a replay checks that
//! the pools have not moved), the graph's own pool (activations and temporaries, allocated
//! while capturing: see `Caching`), or the backend's (scratch, constant arrays), which the
//! recording keeps alive. A replay sends the inputs that changed into the same buffer, in
//! one copy, launches the graph, and brings back its output's real rows (not the padding
//! sequences', see [`crate::graph`]).

use super::{CudaBackend, DeviceArray, OwnedBuffer, SentArray};
use crate::cuda::runtime::{bytes_of, DeviceGraph};
use crate::{
    check, DeviceTensor, GraphKey, KernelError, KvLayer, RecordedStep, Result, StepInputs, Tensor,
};
use std::any::Any;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Most sequences a recorded step is for: a bigger decode batch's kernels run long enough
/// that their launches cost little beside them.
const MAX_GRAPH_SEQS: usize = 256;
/// Where each packed input starts: a multiple of this many bytes (the widest vector load).
const INPUT_ALIGN: usize = 16;

/// The step being recorded.
pub(in crate::cuda) struct Capture {
    key: GraphKey,
    inputs: PackedInputs,
    /// Backend arrays the recorded launches read beside the inputs (the rotary
    /// frequencies), kept alive for the replays.
    kept: Vec<Arc<OwnedBuffer>>,
}

/// A recorded step's input arrays in one buffer: where each lies, and what it holds.
struct PackedInputs {
    layout: Vec<(&'static str, Range<usize>)>,
    sent: Vec<u8>,
    buf: Arc<OwnedBuffer>,
}

/// The arrays end to end, each from a multiple of `INPUT_ALIGN` bytes: where each lies, and
/// the bytes.
fn pack(arrays: &[(&'static str, Vec<u32>)]) -> (Vec<(&'static str, Range<usize>)>, Vec<u8>) {
    let mut layout = Vec::with_capacity(arrays.len());
    let mut bytes = Vec::new();
    for (role, data) in arrays {
        bytes.resize(bytes.len().next_multiple_of(INPUT_ALIGN), 0);
        let start = bytes.len();
        bytes.extend_from_slice(bytes_of(data));
        layout.push((*role, start..bytes.len()));
    }
    (layout, bytes)
}

/// The smallest range of bytes outside which `a` and `b` (of one length) agree.
fn changed(a: &[u8], b: &[u8]) -> Range<usize> {
    let first = a.iter().zip(b).position(|(x, y)| x != y);
    let last = a.iter().zip(b).rposition(|(x, y)| x != y);
    match (first, last) {
        (Some(f), Some(l)) => f..l + 1,
        _ => 0..0,
    }
}

impl Capture {
    /// The device array an op asks for while recording: the step's input of that role,
    /// which must hold the same values (else the replays would send other values than the
    /// op reads), or an array already on the device for the whole recording's life.
    pub(super) fn array(
        &mut self,
        role: &'static str,
        bytes: &[u8],
        sent: &Mutex<HashMap<&'static str, SentArray>>,
    ) -> Result<DeviceArray> {
        let inputs = &self.inputs;
        if let Some((_, range)) = inputs.layout.iter().find(|(r, _)| *r == role) {
            check("record step", inputs.sent[range.clone()] == *bytes, || {
                format!("an op's {role} array is not the step's: a replay would send it wrong")
            })?;
            return Ok(DeviceArray {
                buf: inputs.buf.clone(),
                offset: range.start as u64,
            });
        }
        let sent = sent.lock().unwrap_or_else(|e| e.into_inner());
        match sent.get(role) {
            Some((was, buf)) if was[..] == *bytes => {
                self.kept.push(buf.clone());
                Ok(DeviceArray::all_of(buf))
            }
            _ => Err(KernelError::Unsupported {
                op: "record step",
                detail: format!(
                    "an op sends a {role} array that is neither a step input nor on the \
                     device yet"
                ),
            }),
        }
    }
}

/// A recorded step (see the module's comment).
struct CudaStep {
    key: GraphKey,
    graph: Box<dyn DeviceGraph>,
    inputs: Mutex<PackedInputs>,
    /// The log-probabilities, `[rows, vocab]`.
    output: Arc<dyn DeviceTensor>,
    output_len: usize,
    /// The device pools of each KV layer the recording writes.
    kv_pools: Vec<Vec<u64>>,
    _kept: Vec<Arc<OwnedBuffer>>,
}

impl RecordedStep for CudaStep {
    fn launches(&self) -> usize {
        self.graph.launches()
    }
    fn bytes(&self) -> usize {
        let inputs = self.inputs.lock().unwrap_or_else(|e| e.into_inner());
        self.graph.bytes() + inputs.sent.len()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl CudaBackend {
    /// Decode steps of up to `MAX_GRAPH_SEQS` sequences, keyed by their count, their
    /// attention's splits and their block tables' rounded width.
    pub(super) fn graph_key(&self, inputs: &StepInputs) -> Option<GraphKey> {
        if !inputs.is_decode() || inputs.tokens.len() > MAX_GRAPH_SEQS {
            return None;
        }
        let longest = inputs.batch.positions.iter().max()? + 1;
        Some(GraphKey {
            seqs: inputs.tokens.len(),
            splits: longest.div_ceil(self.split_keys),
            table_width: inputs.table_width(),
            picks: !inputs.targets.is_empty(),
        })
    }

    /// The key of the step being recorded, if one is.
    pub(super) fn recording_key(&self) -> Option<GraphKey> {
        let capture = self.capture.lock().unwrap_or_else(|e| e.into_inner());
        capture.as_ref().map(|c| c.key)
    }

    pub(super) fn begin_record(&self, key: GraphKey, inputs: &StepInputs) -> Result<()> {
        check("record step", self.graph_key(inputs) == Some(key), || {
            format!("the step's inputs are not of shape {key:?}")
        })?;
        let mut capture = self.capture.lock().unwrap_or_else(|e| e.into_inner());
        check("record step", capture.is_none(), || {
            "a step is being recorded already".into()
        })?;
        let (layout, sent) = pack(&inputs.arrays(key.table_width));
        let buf = Arc::new(self.keep(self.up(&sent)?));
        self.rt.begin_capture()?;
        *capture = Some(Capture {
            key,
            inputs: PackedInputs { layout, sent, buf },
            kept: Vec::new(),
        });
        Ok(())
    }

    pub(super) fn end_record(
        &self,
        output: Option<&Tensor>,
        kv: &[KvLayer],
    ) -> Result<Box<dyn RecordedStep>> {
        let capture = self
            .capture
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let capture = capture.ok_or_else(|| KernelError::Unsupported {
            op: "record step",
            detail: "no step is being recorded".into(),
        })?;
        // The capture ends whatever happened during it.
        let graph = self.rt.end_capture()?;
        let output = output.ok_or_else(|| KernelError::Unsupported {
            op: "record step",
            detail: "the step failed while being recorded".into(),
        })?;
        let copy = output.device().filter(|c| self.own_copy(c).is_some());
        let output_copy = copy.cloned().ok_or_else(|| KernelError::Unsupported {
            op: "record step",
            detail: "the step's output is not on this device".into(),
        })?;
        let mut kv_pools = Vec::with_capacity(kv.len());
        for layer in kv {
            kv_pools.push(
                self.kv_pool_ptrs(layer)
                    .ok_or_else(|| KernelError::Unsupported {
                        op: "record step",
                        detail: "a KV layer the step writes is not on this device".into(),
                    })?,
            );
        }
        let mut kept = capture.kept;
        for scratch in [&self.gemm_scratch, &self.attention_scratch] {
            let scratch = scratch.lock().unwrap_or_else(|e| e.into_inner());
            kept.extend(scratch.buffers());
        }
        Ok(Box::new(CudaStep {
            key: capture.key,
            graph,
            inputs: Mutex::new(capture.inputs),
            output: output_copy,
            output_len: output.len(),
            kv_pools,
            _kept: kept,
        }))
    }

    pub(super) fn replay(
        &self,
        step: &dyn RecordedStep,
        inputs: &StepInputs,
        kv: &mut [KvLayer],
    ) -> Result<Option<Vec<f32>>> {
        let step =
            step.as_any()
                .downcast_ref::<CudaStep>()
                .ok_or_else(|| KernelError::Unsupported {
                    op: "replay step",
                    detail: format!("not a step recorded by {}", self.name),
                })?;
        let same_pools = kv.len() == step.kv_pools.len()
            && kv
                .iter()
                .zip(&step.kv_pools)
                .all(|(layer, pools)| self.kv_pool_ptrs(layer).as_ref() == Some(pools));
        if self.graph_key(inputs) != Some(step.key) || !same_pools {
            return Ok(None);
        }
        let (layout, bytes) = pack(&inputs.arrays(step.key.table_width));
        let mut sent = step.inputs.lock().unwrap_or_else(|e| e.into_inner());
        if layout != sent.layout {
            return Ok(None);
        }
        let span = changed(&sent.sent, &bytes);
        if !span.is_empty() {
            let at = sent.buf.ptr + span.start as u64;
            self.rt.htod(at, &bytes[span.clone()])?;
            sent.sent[span.clone()].copy_from_slice(&bytes[span]);
        }
        self.rt.launch_graph(&*step.graph)?;
        for layer in kv.iter_mut() {
            layer.mark_written_on_device();
        }
        let row = step.output_len / inputs.rows.len().max(1);
        let mut out = vec![0f32; inputs.returned_rows() * row];
        step.output.download(&mut out)?;
        Ok(Some(out))
    }

    /// The device pointers of a layer's pools, if this backend holds them.
    fn kv_pool_ptrs(&self, layer: &KvLayer) -> Option<Vec<u64>> {
        let pools = &self.own_kv(layer)?.pools;
        Some(pools.planes.iter().map(|(b, _)| b.ptr).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_inputs_start_aligned_and_a_replay_sends_only_the_changed_span() {
        let arrays = vec![
            ("a", vec![1u32, 2, 3]),
            ("b", vec![7u32; 100]),
            ("c", vec![9]),
        ];
        let (layout, bytes) = pack(&arrays);
        let starts: Vec<usize> = layout.iter().map(|(_, r)| r.start).collect();
        assert_eq!(starts, [0, 16, 416]);
        assert_eq!(bytes[416..420], 9u32.to_le_bytes());
        let mut next = arrays.clone();
        next[0].1[2] = 4;
        next[2].1[0] = 10;
        let (_, moved) = pack(&next);
        assert_eq!(
            changed(&bytes, &moved),
            8..417,
            "from a's third value to c's"
        );
        assert!(changed(&bytes, &bytes).is_empty());
    }
}
