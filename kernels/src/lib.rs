//! Vellum backends: the handful of fused ops a Llama-family forward pass needs.
//!
//! The engine talks only to the [`Backend`] trait; it never touches SIMD or CUDA directly.
//! Two implementations: [`cpu::Cpu`] and [`cuda::CudaBackend`] (CUDA C kernels on a GPU, or
//! on the CPU emulator); [`Device`] picks one (see DESIGN.md, "Backends").

pub mod attention;
pub mod cpu;
pub mod cuda;
pub mod device;
pub mod graph;
pub mod pick;
pub mod rope;
pub mod shapes;
pub mod tensor;
pub mod weight;

pub use attention::{BatchLayout, DevicePools, KvData, KvDtype, KvLayer};
pub use device::Device;
pub use graph::{padded_seqs, GraphKey, PaddedStep, RecordedStep, StepInputs, PAD_SLOT};
pub use pick::{Pick, NO_TARGET};
pub use rope::{Rope, RopeScaling};
pub use tensor::{DeviceTensor, Tensor};
pub use weight::{DeviceCopy, QuantTarget, Weight, WeightData};

/// Errors of the kernels crate.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("token id {token} is out of range for an embedding table of {rows} rows")]
    TokenOutOfRange { token: u32, rows: usize },
    #[error("{op}: {detail}")]
    Unsupported { op: &'static str, detail: String },
    #[error(transparent)]
    Cuda(#[from] cuda::CudaError),
    #[error(transparent)]
    Quant(#[from] vellum_quant::QuantError),
}

pub type Result<T> = std::result::Result<T, KernelError>;

/// One output of [`Backend::matmul_many`]: `out = x · wᵀ (+ bias)`.
pub struct MatmulPart<'a> {
    pub w: &'a Weight,
    pub bias: Option<&'a Tensor>,
    pub out: &'a mut Tensor,
}

/// The fused ops of the forward pass. Activations are row-major `f32` (`[rows, width]`)
/// [`Tensor`]s, which a GPU backend keeps on its device from op to op: nothing comes back to
/// the host until someone reads a tensor there. So do the norms' weights and the biases
/// (copied to the device by the first op that reads them).
///
/// Determinism promise: every op computes each row with a fixed reduction order, so a
/// row's result never depends on the other rows of the batch.
pub trait Backend: Send + Sync {
    /// A short name for logs and benchmark ids (`cpu-avx2`, `cpu-scalar`, ...).
    fn name(&self) -> &str;

    /// Brings a model weight, once at load, into the layout this backend's matmuls read
    /// fastest: the CPU's integer dots repack quantized weights 16 rows per register
    /// (`cpu::rows16`) in place of their storage. The weight keeps its values (`row_to_f32`
    /// gives the same bits), so every op still reads it. Default: left as it is.
    fn prepare_weight(&self, w: &mut Weight) -> Result<()> {
        let _ = w;
        Ok(())
    }

    /// Brings an embedding table, once at load, to where `embedding` reads it fastest (the
    /// CUDA backend's device memory, as rows to gather). Default: left as it is.
    fn prepare_embedding(&self, table: &mut Weight) -> Result<()> {
        let _ = table;
        Ok(())
    }

    /// `out[t] = table[tokens[t]]`, dequantized to f32.
    fn embedding(&self, table: &Weight, tokens: &[u32], out: &mut Tensor) -> Result<()>;

    /// Fused residual add + RMSNorm: `residual += delta` (when given), then
    /// `out = residual / rms(residual) * weight`, row by row.
    fn add_rms_norm(
        &self,
        residual: &mut Tensor,
        delta: Option<&Tensor>,
        weight: &Tensor,
        eps: f32,
        out: &mut Tensor,
    ) -> Result<()>;

    /// `out[rows, w.rows] = x[rows, w.cols] · wᵀ (+ bias)`.
    fn matmul(&self, x: &Tensor, w: &Weight, bias: Option<&Tensor>, out: &mut Tensor)
        -> Result<()>;

    /// Several matmuls of the same input (Q/K/V, gate/up) in one go; backends run them as
    /// one parallel region or one launch.
    fn matmul_many(&self, x: &Tensor, parts: &mut [MatmulPart]) -> Result<()> {
        for p in parts.iter_mut() {
            self.matmul(x, p.w, p.bias, p.out)?;
        }
        Ok(())
    }

    /// Rotary embedding in place on `x[T, n_heads * head_dim]` (half-rotation / neox layout).
    fn rotary(&self, x: &mut Tensor, positions: &[u32], n_heads: usize, rope: &Rope) -> Result<()>;

    /// Writes `k`, `v` (`[T, kv_width]`) into the paged cache at `slot_mapping[t]`.
    fn write_kv(
        &self,
        cache: &mut KvLayer,
        k: &Tensor,
        v: &Tensor,
        slot_mapping: &[u32],
    ) -> Result<()>;

    /// The ops between a layer's QKV matmul and its attention, as one so that a backend can
    /// fuse them: rotary on `q` (`n_heads` heads) and `k` (the cache's KV heads) at the
    /// batch's positions, then `k` and `v` into the cache at its slot mapping. Default: the
    /// three ops in turn.
    fn rotary_write_kv(
        &self,
        (q, k, v): (&mut Tensor, &mut Tensor, &Tensor),
        n_heads: usize,
        rope: &Rope,
        cache: &mut KvLayer,
        batch: &BatchLayout,
    ) -> Result<()> {
        rotary_then_write_kv(self, (q, k, v), n_heads, rope, cache, batch)
    }

    /// Causal attention of the ragged batch's queries over the paged cache.
    /// `q`: `[T, n_heads * head_dim]`, `out`: same shape.
    fn attention(
        &self,
        q: &Tensor,
        cache: &KvLayer,
        batch: &BatchLayout,
        n_heads: usize,
        out: &mut Tensor,
    ) -> Result<()>;

    /// `out[i] = x[rows[i]]`, rows of `width` values: the rows of the residual stream that
    /// go on to the LM head. Default: on the host.
    fn gather_rows(&self, x: &Tensor, width: usize, rows: &[u32], out: &mut Tensor) -> Result<()> {
        shapes::gather_rows(x, width, rows, out)?;
        let x = x.host()?;
        let out = out.host_for_overwrite();
        for (o, &r) in out.chunks_exact_mut(width).zip(rows) {
            o.copy_from_slice(&x[r as usize * width..(r as usize + 1) * width]);
        }
        Ok(())
    }

    /// `gate = silu(gate) * up`, element-wise, in place.
    fn silu_mul(&self, gate: &mut Tensor, up: &Tensor) -> Result<()>;

    /// `out = (silu(gate) · up) · wᵀ`: the MLP's activation and down projection, as one op
    /// so that a backend can fuse them. `gate` is left holding its input or silu(gate) · up.
    /// Default: `silu_mul`, then `matmul`.
    fn silu_mul_matmul(
        &self,
        gate: &mut Tensor,
        up: &Tensor,
        w: &Weight,
        out: &mut Tensor,
    ) -> Result<()> {
        self.silu_mul(gate, up)?;
        self.matmul(gate, w, None, out)
    }

    /// In-place log-softmax over rows of width `width`.
    fn log_softmax(&self, x: &mut Tensor, width: usize) -> Result<()>;

    /// For each row `r` of `x` (`[rows, width]`): its [`pick::argmax`] and its value at
    /// `targets[r]` (at the argmax for [`NO_TARGET`]), into `out` (`[rows, 2]`: value, index
    /// as f32; see [`Pick::from_values`]). What a greedy or scored row needs, where the rows
    /// are. Default: on the host.
    fn pick_rows(&self, x: &Tensor, width: usize, targets: &[u32], out: &mut Tensor) -> Result<()> {
        shapes::pick_rows(x, width, targets, out)?;
        let x = x.host()?;
        pick::pick_rows_host(&x, width, targets, out.host_for_overwrite());
        Ok(())
    }

    /// For each row `rows[i]` of `x` (`[_, width]`): its `k` most likely tokens, in
    /// [`pick::ranked`] order (`f32::total_cmp`, largest first, then index), into `out`
    /// (`[rows.len(), k, 2]`: value, index as f32; see [`pick::ranked_pairs`]). What a draw
    /// within `top_k` or a greedy row with alternatives needs, where the rows are; `k` at
    /// most [`pick::MAX_RANKED`] and the width. Default: on the host.
    fn top_rows(
        &self,
        x: &Tensor,
        width: usize,
        rows: &[u32],
        k: usize,
        out: &mut Tensor,
    ) -> Result<()> {
        shapes::top_rows(x, width, rows, k, out)?;
        let x = x.host()?;
        pick::top_rows_host(&x, width, rows, k, out.host_for_overwrite());
        Ok(())
    }

    /// The shape under which this backend can record `inputs`' step and replay it (see
    /// [`graph`]), or `None`: the step runs op by op. Default: `None`.
    fn step_graph_key(&self, inputs: &StepInputs) -> Option<GraphKey> {
        let _ = inputs;
        None
    }

    /// Starts recording the ops that follow, until [`Backend::end_step_record`], as one
    /// replayable step of shape `key` (from `step_graph_key`), instead of running them.
    fn begin_step_record(&self, key: GraphKey, inputs: &StepInputs) -> Result<()> {
        let _ = (key, inputs);
        Err(no_step_records(self.name(), "begin_step_record"))
    }

    /// Ends the recording begun last. `output` is what the step's ops produced (its
    /// log-probabilities); `None` when they failed, and the recording is dropped.
    fn end_step_record(
        &self,
        output: Option<&Tensor>,
        kv: &[KvLayer],
    ) -> Result<Box<dyn RecordedStep>> {
        let _ = (output, kv);
        Err(no_step_records(self.name(), "end_step_record"))
    }

    /// Runs a recorded step on `inputs` (of its key's shape), writing the KV cache as its
    /// ops would, and returns the output's values; `None` if the recording no longer
    /// applies (the KV pools it wrote moved), and nothing ran.
    fn replay_step(
        &self,
        step: &dyn RecordedStep,
        inputs: &StepInputs,
        kv: &mut [KvLayer],
    ) -> Result<Option<Vec<f32>>> {
        let _ = (step, inputs, kv);
        Err(no_step_records(self.name(), "replay_step"))
    }
}

/// What the `Backend` methods of recorded steps answer on a backend without them.
fn no_step_records(backend: &str, op: &'static str) -> KernelError {
    KernelError::Unsupported {
        op,
        detail: format!("{backend} does not record steps"),
    }
}

/// `Backend::rotary_write_kv` as its three ops in turn.
pub fn rotary_then_write_kv<B: Backend + ?Sized>(
    be: &B,
    (q, k, v): (&mut Tensor, &mut Tensor, &Tensor),
    n_heads: usize,
    rope: &Rope,
    cache: &mut KvLayer,
    batch: &BatchLayout,
) -> Result<()> {
    be.rotary(q, &batch.positions, n_heads, rope)?;
    be.rotary(k, &batch.positions, cache.n_kv_heads, rope)?;
    be.write_kv(cache, k, v, &batch.slot_mapping)
}

pub(crate) fn check(op: &'static str, ok: bool, detail: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(KernelError::Shape {
            op,
            detail: detail(),
        })
    }
}
