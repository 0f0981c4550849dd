//! The CPU backend: work spread over rows/heads by a spinning pool (`pool`), SIMD
//! primitives chosen once at start-up.

mod kv_rows;
pub mod membw;
pub mod pool;
pub mod qdot;
mod rows;
pub mod rows16;
pub mod simd;
pub mod vmath;

use crate::{
    check, shapes, Backend, BatchLayout, KvData, KvLayer, MatmulPart, Result, Rope, Tensor, Weight,
    WeightData,
};
use pool::Pool;
use qdot::ActBits;
use rows16::Rows16;
use simd::Isa;
use vellum_quant::{BlockFormat, QK};

/// How far ahead of the weight row being read the float path prefetches, in bytes. Measured
/// on SmolLM2 (2 threads): Q4_0 decode 66 → 104 tok/s, f16 53 → 64; 1–16 KB all help about
/// as much (benches/RESULTS.md). The hardware prefetchers alone restart at every task.
const PREFETCH_BYTES: usize = 4096;

/// Output features handled by one pool task in a matmul: enough work to amortise the
/// task, few enough that 2–64 cores all get some.
const MATMUL_CHUNK: usize = 16;
// A task's rows start on a group of the integer path's repacked weights.
const _: () = assert!(MATMUL_CHUNK.is_multiple_of(rows16::ROWS));

/// Query rows (heads × tokens of one sequence) that share each pass over a KV head's rows.
/// 32 scored 4,304 tokens 6% faster than 16; a tile's scores for a 4k context (512 KiB)
/// still fit in L2.
const ATTENTION_TILE_ROWS: usize = 32;

/// An output that pool tasks fill in disjoint runs (a matmul's `[t, n]` output, each task
/// its own features of every row), which `&mut` slices cannot express.
struct DisjointOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: tasks only write through `run`, whose callers guarantee disjoint runs.
unsafe impl Sync for DisjointOut {}

impl DisjointOut {
    fn new(out: &mut [f32]) -> DisjointOut {
        DisjointOut {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        }
    }

    /// The `n` values from `at`.
    ///
    /// # Safety
    /// No other live reference may overlap the run (each task has its own runs), and the
    /// output must outlive the returned slice.
    #[allow(clippy::mut_from_ref)]
    unsafe fn run(&self, at: usize, n: usize) -> &mut [f32] {
        assert!(at + n <= self.len, "run {at}+{n} past {}", self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(at), n)
    }
}

/// `out[r * n + i] = x[r] · w[j0 + i]` for `n = out.len() / t` weight rows from `j0` and
/// every activation row `r` of `x` (token-major, as the matmul's output is), reading the
/// weights in their stored format (see `simd::Row`).
fn dot_weight_rows(isa: Isa, x: &[f32], w: &Weight, j0: usize, out: &mut [f32]) {
    let k = w.cols;
    let n = out.len() / (x.len() / k);
    // This task's rows, and how many follow it in the matrix (for the prefetcher).
    let task = (n, w.rows - j0 - n);
    let dense = move |r: usize| (j0 + r) * k..(j0 + r + 1) * k;
    match &w.data {
        WeightData::F32(v) => dot_rows_tiled(isa, x, task, |r| &v[dense(r)], out),
        WeightData::F16(v) => dot_rows_tiled(isa, x, task, |r| &v[dense(r)], out),
        WeightData::BF16(v) => dot_rows_tiled(isa, x, task, |r| &v[dense(r)], out),
        WeightData::Int8PerRow { q, scales } => dot_rows_tiled(
            isa,
            x,
            task,
            |r| rows::Int8Row(&q[dense(r)], scales[j0 + r]),
            out,
        ),
        WeightData::Block(f, bytes) => {
            let rb = k / QK * f.block_bytes();
            let row = move |r: usize| &bytes[(j0 + r) * rb..(j0 + r + 1) * rb];
            match f {
                BlockFormat::Q8_0 => dot_rows_tiled(isa, x, task, |r| rows::Q8_0Row(row(r)), out),
                BlockFormat::Q4_0 => dot_rows_tiled(isa, x, task, |r| rows::Q4_0Row(row(r)), out),
                BlockFormat::Q4_1 => dot_rows_tiled(isa, x, task, |r| rows::Q4_1Row(row(r)), out),
            }
        }
        WeightData::Int4(f, d) => {
            let groups = k.div_ceil(f.group);
            let packed = move |r: usize| &d.packed[(j0 + r) * k / 2..(j0 + r + 1) * k / 2];
            let span = move |r: usize| (j0 + r) * groups..(j0 + r + 1) * groups;
            if f.symmetric {
                let row = |r| rows::Int4Row::<true> {
                    packed: packed(r),
                    scales: &d.scales[span(r)],
                    mins: &[],
                    group: f.group,
                };
                dot_rows_tiled(isa, x, task, row, out)
            } else {
                let row = |r| rows::Int4Row::<false> {
                    packed: packed(r),
                    scales: &d.scales[span(r)],
                    mins: &d.mins[span(r)],
                    group: f.group,
                };
                dot_rows_tiled(isa, x, task, row, out)
            }
        }
        WeightData::Rows16(p) => {
            // Prepared for integer dots and met by a backend without them (tests, another
            // `Cpu`): this task's rows decoded to f32 first. Correct, not fast.
            let mut rows = vec![0f32; n * k];
            for (r, row) in rows.chunks_exact_mut(k).enumerate() {
                p.row_to_f32(j0 + r, row);
            }
            dot_rows_tiled(isa, x, (n, 0), |r| &rows[r * k..(r + 1) * k], out)
        }
    }
}

/// Tiles of `TILE_W` weight rows × `TILE_T` activation rows where the path has them, then
/// multi-row passes for what is left. Every result equals the single-pair dot (tested).
/// `row(i)` gives weight row `i` of the `n` (cheap views, made as needed).
/// Rows `n..n + ahead` may be made too: they are only prefetched (about `PREFETCH_BYTES`
/// ahead of the row being computed, past the end of this task's rows too).
fn dot_rows_tiled<V: simd::Row>(
    isa: Isa,
    x: &[f32],
    (n, ahead): (usize, usize),
    row: impl Fn(usize) -> V,
    out: &mut [f32],
) {
    let t = out.len() / n.max(1);
    let (tw, tt) = (simd::TILE_W, simd::TILE_T);
    let distance = match n {
        0 => 0,
        _ => PREFETCH_BYTES.div_ceil(row(0).bytes().len().max(1)),
    };
    let prefetch = |i: usize| {
        if i + distance < n + ahead {
            simd::prefetch(row(i + distance).bytes());
        }
    };
    let mut j = 0;
    if simd::has_tile(isa) && t >= tt {
        let k = x.len() / t;
        // Activation tiles outside, weight tiles inside: the task's weight rows (a chunk of
        // MATMUL_CHUNK) stay in L1/L2 while each tile of activation rows is read once, where
        // the other order streamed every activation row (megabytes in a prefill) from L2/L3
        // once per weight tile.
        let tiled = n / tw * tw;
        let views: Vec<V> = (0..tiled).map(&row).collect();
        let mut r = 0;
        while r + tt <= t {
            let xs: [&[f32]; simd::TILE_T] =
                std::array::from_fn(|i| &x[(r + i) * k..(r + i + 1) * k]);
            for j in (0..tiled).step_by(tw) {
                if r == 0 {
                    (j..j + tw).for_each(prefetch);
                }
                let w: [&V; simd::TILE_W] = std::array::from_fn(|i| &views[j + i]);
                let mut res = [[0f32; simd::TILE_T]; simd::TILE_W];
                simd::dot_tile(isa, xs, w, &mut res);
                for (i, vals) in res.iter().enumerate() {
                    for (dr, &v) in vals.iter().enumerate() {
                        out[(r + dr) * n + j + i] = v;
                    }
                }
            }
            r += tt;
        }
        for (i, v) in views.iter().enumerate() {
            dot_rows_all(isa, &x[r * k..], v, &mut out[r * n..], (n, i));
        }
        j = tiled;
    }
    for i in j..n {
        prefetch(i);
        dot_rows_all(isa, x, &row(i), out, (n, i));
    }
}

/// `out[r * n + i] = x[r] · w` for every activation row `r` of `x`.
fn dot_rows_all<R: simd::Row + ?Sized>(
    isa: Isa,
    x: &[f32],
    w: &R,
    out: &mut [f32],
    (n, i): (usize, usize),
) {
    let k = w.len();
    let rows = x.len() / k.max(1);
    let per = simd::rows_per_pass(isa);
    let mut res = [0f32; 8];
    let mut t = 0;
    while t + per <= rows && per > 1 {
        let mut xs: [&[f32]; 8] = [&[]; 8];
        for (d, row) in xs.iter_mut().take(per).enumerate() {
            *row = &x[(t + d) * k..(t + d + 1) * k];
        }
        simd::dot_rows(isa, &xs[..per], w, &mut res[..per]);
        for (d, &v) in res[..per].iter().enumerate() {
            out[(t + d) * n + i] = v;
        }
        t += per;
    }
    for r in t..rows {
        out[r * n + i] = simd::dot_row(isa, &x[r * k..(r + 1) * k], w);
    }
}

thread_local! {
    /// A matmul task's block, kept by each thread between tasks: allocating and zeroing it
    /// each time was 3% of a prefill.
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// This thread's scratch, `len` long (its values are whatever the last task left).
fn take_scratch(len: usize) -> Vec<f32> {
    let mut v = SCRATCH.take();
    if v.len() < len {
        v.resize(len, 0.0);
    }
    v.truncate(len);
    v
}

fn give_back_scratch(v: Vec<f32>) {
    SCRATCH.set(v);
}

/// The CPU backend.
#[derive(Debug, Clone)]
pub struct Cpu {
    isa: Isa,
    name: String,
    int_dot: Option<ActBits>,
}

impl Default for Cpu {
    /// The best SIMD path. Quantized weights meet activations rounded to int16 per block of
    /// 32 in integer dots (`qdot`, `rows16`; AVX-512 VNNI, AVX2 `vpmaddubsw` or NEON `sdot`): ~2x the
    /// speed of decoding the weights to f32, with log-probabilities within ~3e-3 nats of the
    /// float path on SmolLM2 (README, "Quantization accuracy"). `VELLUM_INT_DOT` chooses: `=0`
    /// decodes the weights to f32 (transformers' numbers to 1e-5), `=8` (or `=1`) rounds
    /// activations to int8 as llama.cpp does (faster still at batch, but log-probabilities
    /// move by up to ~0.3 nats), `=16` is the default.
    fn default() -> Self {
        let int_dot = match std::env::var("VELLUM_INT_DOT").as_deref() {
            Ok("8" | "1") => Some(ActBits::Eight),
            Ok("16") | Err(_) => Some(ActBits::Sixteen),
            Ok("0") => None,
            Ok(other) => {
                tracing::warn!("VELLUM_INT_DOT={other:?} is not 0, 8 (or 1) or 16: ignored");
                None
            }
        };
        // The scalar path keeps the float decoding: its integer reference is slow.
        let isa = simd::isa();
        Cpu::with_isa(isa).with_int_dot(int_dot.filter(|_| isa != Isa::Scalar))
    }
}

impl Cpu {
    pub fn new() -> Cpu {
        Cpu::default()
    }

    /// A CPU backend forced onto one instruction-set path (parity tests, benches).
    pub fn with_isa(isa: Isa) -> Cpu {
        Cpu {
            isa,
            name: format!("cpu-{}", isa.name()),
            int_dot: None,
        }
    }

    /// With `Some(bits)`, quantized weights (GGUF blocks, planar int4, int8 per channel) meet
    /// activations rounded to `bits` in integer dot products (`qdot`, `rows16`): faster than
    /// decoding the weights to f32, at the cost of that rounding (see `Default`). On the
    /// scalar ISA this runs the (slow) scalar reference.
    pub fn with_int_dot(mut self, bits: Option<ActBits>) -> Cpu {
        self.int_dot = bits;
        self.name = match bits {
            Some(b) => format!("cpu-{}-{}dot", self.isa.name(), b.name()),
            None => format!("cpu-{}", self.isa.name()),
        };
        self
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }
}

impl Backend for Cpu {
    fn name(&self) -> &str {
        &self.name
    }

    /// Under integer dots, a quantized weight the integer path reads is repacked 16 rows
    /// per register (`rows16`) in place of its storage; anything else stays as it is.
    fn prepare_weight(&self, w: &mut Weight) -> Result<()> {
        if self.int_dot.is_some() {
            if let Some(p) = Rows16::pack(w) {
                *w = Weight::new(w.rows, w.cols, WeightData::Rows16(Box::new(p)))?;
            }
        }
        Ok(())
    }

    fn embedding(&self, table: &Weight, tokens: &[u32], out: &mut Tensor) -> Result<()> {
        shapes::embedding(table, tokens, out)?;
        let d = table.cols;
        let out = out.host_for_overwrite();
        let mut rows: Vec<_> = out.chunks_mut(d.max(1)).zip(tokens).collect();
        Pool::global().for_each_mut(&mut rows, |(row, t)| table.row_to_f32(**t as usize, row));
        Ok(())
    }

    fn add_rms_norm(
        &self,
        residual: &mut Tensor,
        delta: Option<&Tensor>,
        weight: &Tensor,
        eps: f32,
        out: &mut Tensor,
    ) -> Result<()> {
        shapes::add_rms_norm(residual, delta, weight, out)?;
        let d = weight.len();
        let (weight, delta) = (weight.host()?, delta.map(Tensor::host).transpose()?);
        let (weight, delta) = (&weight[..], delta.as_deref());
        let (residual, out) = (residual.host_mut()?, out.host_for_overwrite());
        let isa = self.isa;
        let mut rows: Vec<_> = residual
            .chunks_mut(d)
            .zip(out.chunks_mut(d))
            .enumerate()
            .collect();
        Pool::global().for_each_mut(&mut rows, |(r, (res, o))| {
            let r = *r;
            if let Some(delta) = delta {
                res.iter_mut()
                    .zip(&delta[r * d..(r + 1) * d])
                    .for_each(|(a, b)| *a += b);
            }
            let ms = simd::dot(isa, res, res) / d as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for ((o, x), w) in o.iter_mut().zip(res.iter()).zip(weight) {
                *o = w * (x * inv);
            }
        });
        Ok(())
    }

    fn matmul(
        &self,
        x: &Tensor,
        w: &Weight,
        bias: Option<&Tensor>,
        out: &mut Tensor,
    ) -> Result<()> {
        self.matmul_many(x, &mut [MatmulPart { w, bias, out }])
    }

    fn matmul_many(&self, x: &Tensor, parts: &mut [MatmulPart]) -> Result<()> {
        let Some(k) = parts.first().map(|p| p.w.cols) else {
            return Ok(());
        };
        let mut t = 0;
        for p in parts.iter() {
            check("matmul", p.w.cols == k, || {
                format!("weights of {} and {k} columns in one call", p.w.cols)
            })?;
            t = shapes::matmul(x, p.w, p.bias, p.out)?;
        }
        if t == 0 {
            return Ok(());
        }
        let x = &x.host()?[..];
        let biases: Vec<_> = parts
            .iter()
            .map(|p| p.bias.map(Tensor::host).transpose())
            .collect::<Result<_>>()?;
        let isa = self.isa;
        // Integer dots on the weights prepared for them (`prepare_weight`).
        let q8 = self
            .int_dot
            .filter(|_| parts.iter().any(|p| p.w.packed_rows16().is_some()))
            .map(|bits| qdot::IntActs::quantize(x, k, bits));
        // A task computes up to MATMUL_CHUNK output features for every activation row (each
        // weight row is read once whatever t is) as a token-major [t, features] block, then
        // copies its rows into the [t, n] output. The block was feature-major once, and its
        // transposition, a stride of t floats (2 KiB at t = 512) through a few L1 sets, cost
        // 10% of a prefill. All parts share one parallel region: fewer hand-offs between
        // threads per layer.
        let specs: Vec<(&Weight, Option<&[f32]>)> = parts
            .iter()
            .zip(&biases)
            .map(|(p, b)| (p.w, b.as_deref()))
            .collect();
        let outs: Vec<DisjointOut> = parts
            .iter_mut()
            .map(|p| DisjointOut::new(p.out.host_for_overwrite()))
            .collect();
        let tasks: Vec<(usize, usize, usize)> = specs
            .iter()
            .enumerate()
            .flat_map(|(pi, (w, _))| {
                (0..w.rows)
                    .step_by(MATMUL_CHUNK)
                    .map(move |j0| (pi, j0, MATMUL_CHUNK.min(w.rows - j0)))
            })
            .collect();
        // The spinning pool, not rayon: these run back to back all through a forward pass.
        Pool::global().run(tasks.len(), &|task| {
            let (pi, j0, n) = tasks[task];
            let (w, bias) = specs[pi];
            let mut scratch = if t == 1 {
                Vec::new()
            } else {
                take_scratch(n * t)
            };
            let block: &mut [f32] = if t == 1 {
                // SAFETY: task (pi, j0) is the only one to touch features j0..j0 + n of part
                // pi, and with one activation row those are one contiguous run.
                unsafe { outs[pi].run(j0, n) }
            } else {
                &mut scratch
            };
            match (q8.as_ref(), w.packed_rows16()) {
                (Some(q8), Some(p)) => rows16::dot_rows(isa, p, j0, q8, block),
                _ => dot_weight_rows(isa, x, w, j0, block),
            }
            if let Some(b) = bias {
                for row in block.chunks_exact_mut(n) {
                    row.iter_mut()
                        .zip(&b[j0..j0 + n])
                        .for_each(|(o, b)| *o += b);
                }
            }
            if t > 1 {
                for (r, src) in scratch.chunks_exact(n).enumerate() {
                    // SAFETY: as above; row r's features j0..j0 + n are this task's alone.
                    unsafe { outs[pi].run(r * w.rows + j0, n) }.copy_from_slice(src);
                }
                give_back_scratch(scratch);
            }
        });
        Ok(())
    }

    fn rotary(&self, x: &mut Tensor, positions: &[u32], n_heads: usize, rope: &Rope) -> Result<()> {
        shapes::rotary(x, positions, n_heads, rope)?;
        let x = x.host_mut()?;
        let hd = rope.head_dim;
        let width = n_heads * hd;
        let half = hd / 2;
        let mut rows: Vec<_> = x.chunks_mut(width.max(1)).zip(positions).collect();
        Pool::global().for_each_mut(&mut rows, |(row, pos)| {
            let pos = **pos;
            let mut cos = vec![0f32; half];
            let mut sin = vec![0f32; half];
            rope.cos_sin(pos, &mut cos, &mut sin);
            for head in row.chunks_exact_mut(hd) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x0, x1) = (a[i], b[i]);
                    a[i] = x0 * cos[i] - x1 * sin[i];
                    b[i] = x1 * cos[i] + x0 * sin[i];
                }
            }
        });
        Ok(())
    }

    fn write_kv(
        &self,
        cache: &mut KvLayer,
        k: &Tensor,
        v: &Tensor,
        slot_mapping: &[u32],
    ) -> Result<()> {
        shapes::write_kv(cache, k, v, slot_mapping)?;
        cache.drop_device_copy()?;
        cache.store_slots(&k.host()?, &v.host()?, slot_mapping);
        Ok(())
    }

    fn attention(
        &self,
        q: &Tensor,
        cache: &KvLayer,
        batch: &BatchLayout,
        n_heads: usize,
        out: &mut Tensor,
    ) -> Result<()> {
        shapes::attention(q, cache, batch, n_heads, out)?;
        check("attention", !cache.host_is_stale(), || {
            "the KV pools hold values written on a device: sync the layer \
             (KvLayer::sync_host) first"
                .into()
        })?;
        let (q, out) = (&q.host()?[..], out.host_for_overwrite());
        let (hd, n_kv) = (cache.head_dim, cache.n_kv_heads);
        if hd == 0 || n_heads == 0 {
            return Ok(());
        }
        let group = n_heads / n_kv;
        let scale = 1.0 / (hd as f32).sqrt();
        let (bs, sw, isa) = (cache.block_size, cache.slot_width(), self.isa);
        // Work items: the query heads of one KV head for a few tokens of one sequence, so
        // that each chunk of K and V rows is read once for up to ATTENTION_TILE_ROWS rows.
        let tile_tokens = (ATTENTION_TILE_ROWS / group).max(1);
        let mut tiles = Vec::new();
        // Where the K/V slot of every cached position each sequence's tokens see in this
        // step starts (KV head 0; a tile's slices of K and V start at its own head).
        let mut slots = Vec::with_capacity(batch.num_seqs());
        for (s, table) in batch.block_tables.iter().enumerate() {
            let tokens = batch.seq_offsets[s]..batch.seq_offsets[s + 1];
            let visible = tokens
                .clone()
                .map(|t| batch.positions[t] as usize + 1)
                .max();
            let visible = visible.unwrap_or(0);
            let seq_slots: Vec<usize> = table
                .iter()
                .flat_map(|&blk| (0..bs).map(move |i| (blk as usize * bs + i) * sw))
                .take(visible)
                .collect();
            slots.push(seq_slots);
            for kvh in 0..n_kv {
                for t0 in tokens.clone().step_by(tile_tokens) {
                    tiles.push((s, kvh, t0..(t0 + tile_tokens).min(tokens.end)));
                }
            }
        }
        let out = DisjointOut::new(out);
        Pool::global().for_each_mut(&mut tiles, |(s, kvh, tokens)| {
            let (s, kvh) = (*s, *kvh);
            let mut rows = Vec::with_capacity(tokens.len() * group);
            for t in tokens.clone() {
                let visible = batch.positions[t] as usize + 1;
                let first = t * n_heads + kvh * group;
                // SAFETY: this tile alone writes its tokens' heads of KV head `kvh`, and
                // `out` outlives the job.
                let outs = unsafe { out.run(first * hd, group * hd) };
                for (g, out) in outs.chunks_mut(hd).enumerate() {
                    let q = &q[(first + g) * hd..(first + g + 1) * hd];
                    rows.push(simd::QueryRow { q, visible, out });
                }
            }
            let at = kvh * hd;
            match (&cache.k, &cache.v) {
                (KvData::F32(k), KvData::F32(v)) => {
                    simd::attend_rows(isa, &mut rows, (&k[at..], &v[at..]), &slots[s], scale)
                }
                (KvData::F16(k), KvData::F16(v)) => {
                    simd::attend_rows(isa, &mut rows, (&k[at..], &v[at..]), &slots[s], scale)
                }
                (
                    KvData::Int8 {
                        codes: kc,
                        scales: ks,
                        group,
                    },
                    KvData::Int8 {
                        codes: vc,
                        scales: vs,
                        ..
                    },
                ) => {
                    let k = kv_rows::Int8Rows::of_head(kc, ks, *group, hd, kvh);
                    let v = kv_rows::Int8Rows::of_head(vc, vs, *group, hd, kvh);
                    simd::attend_rows(isa, &mut rows, (&k, &v), &slots[s], scale)
                }
                _ => unreachable!("K and V pools of one dtype (checked)"),
            }
        });
        Ok(())
    }

    fn silu_mul(&self, gate: &mut Tensor, up: &Tensor) -> Result<()> {
        shapes::silu_mul(gate, up)?;
        let (gate, up) = (gate.host_mut()?, &up.host()?[..]);
        let isa = self.isa;
        let mut chunks: Vec<_> = gate.chunks_mut(4096).zip(up.chunks(4096)).collect();
        Pool::global().for_each_mut(&mut chunks, |(g, u)| vmath::silu_mul(isa, g, u));
        Ok(())
    }

    /// The host's ranking (`pick::ranked`), a row per pool task: a step may rank a row for
    /// each of hundreds of sequences.
    fn top_rows(
        &self,
        x: &Tensor,
        width: usize,
        rows: &[u32],
        k: usize,
        out: &mut Tensor,
    ) -> Result<()> {
        shapes::top_rows(x, width, rows, k, out)?;
        if k == 0 {
            return Ok(());
        }
        let x = x.host()?;
        let out = out.host_for_overwrite();
        let mut tasks: Vec<_> = out.chunks_mut(2 * k).zip(rows).collect();
        Pool::global().for_each_mut(&mut tasks, |(o, r)| {
            crate::pick::top_rows_host(&x, width, &[**r], k, o)
        });
        Ok(())
    }

    fn log_softmax(&self, x: &mut Tensor, width: usize) -> Result<()> {
        shapes::rows_of("log_softmax", x.len(), width)?;
        let x = x.host_mut()?;
        let isa = self.isa;
        let mut rows: Vec<_> = x.chunks_mut(width).collect();
        Pool::global().for_each_mut(&mut rows, |row| vmath::log_softmax(isa, row));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KvDtype;
    use vellum_quant::DType;

    /// Every dense format, plus the block formats when `cols` is whole blocks.
    fn weights(rows: usize, cols: usize) -> Vec<Weight> {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.3)
            .collect();
        let mut out: Vec<Weight> = [DType::F32, DType::F16, DType::BF16]
            .iter()
            .map(|&d| Weight::dense(rows, cols, d, &v).unwrap())
            .collect();
        let int8 = out[0].quantize(crate::QuantTarget::Int8PerChannel).unwrap();
        out.push(int8);
        let blocks = if cols.is_multiple_of(QK) {
            &[BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4_1][..]
        } else {
            &[]
        };
        for &f in blocks {
            let mut bytes = Vec::new();
            f.quantize(&v, &mut bytes).unwrap();
            out.push(Weight::new(rows, cols, WeightData::Block(f, bytes)).unwrap());
        }
        for name in ["int4:g64", "int4:g64:sym", "int4:g128", "int4:g128:sym"] {
            let target = crate::QuantTarget::parse(name).unwrap();
            // Rows of whole 32-value chunks; the last group of a row may be short.
            if cols.is_multiple_of(QK) {
                out.push(out[0].quantize(target).unwrap());
            }
        }
        out
    }

    /// The fused dot of every format equals, bit for bit, the f32 dot of the dequantized
    /// row on the same path; and every path is close to an f64 reference.
    #[test]
    fn fused_rows_match_dequantize_then_dot_on_every_path() {
        for cols in [32usize, 96, 576] {
            let x: Vec<f32> = (0..cols)
                .map(|i| ((i * 31 % 97) as f32 - 48.0) / 40.0)
                .collect();
            for w in weights(5, cols) {
                let mut row = vec![0f32; cols];
                for j in 0..w.rows {
                    w.row_to_f32(j, &mut row);
                    let exact: f64 = x.iter().zip(&row).map(|(a, b)| *a as f64 * *b as f64).sum();
                    for isa in Isa::all_supported() {
                        let mut fused = [0f32];
                        dot_weight_rows(isa, &x, &w, j, &mut fused);
                        let fused = fused[0];
                        let plain = simd::dot(isa, &x, &row);
                        assert_eq!(
                            fused.to_bits(),
                            plain.to_bits(),
                            "{} {isa:?} row {j}",
                            w.format_name()
                        );
                        assert!(
                            (fused as f64 - exact).abs() < 1e-4,
                            "{} {isa:?}",
                            w.format_name()
                        );
                    }
                }
            }
        }
    }

    /// A row's result does not depend on how many rows share the pass (batch invariance).
    #[test]
    fn multi_row_passes_equal_single_rows() {
        let cols = 96;
        for w in weights(5, cols) {
            for t in 1..=17 {
                let x: Vec<f32> = (0..t * cols)
                    .map(|i| ((i * 13 % 71) as f32 - 35.0) / 30.0)
                    .collect();
                for isa in Isa::all_supported() {
                    // All weight rows at once (tiles where the path has them) vs one pair at a time.
                    let mut all = vec![0f32; w.rows * t];
                    dot_weight_rows(isa, &x, &w, 0, &mut all);
                    for j in 0..w.rows {
                        for r in 0..t {
                            let mut one = [0f32];
                            dot_weight_rows(isa, &x[r * cols..(r + 1) * cols], &w, j, &mut one);
                            let got = all[r * w.rows + j];
                            assert_eq!(
                                got.to_bits(),
                                one[0].to_bits(),
                                "{} {isa:?} t={t} j={j} r={r}",
                                w.format_name()
                            );
                        }
                    }
                }
            }
        }
    }

    /// The integer-dot matmul is the float matmul of the rounded activations (to 1e-5 of the
    /// largest output: only the summation order differs), stays within the rounding of the
    /// float one (int16 activations 100x closer than int8), and a row alone gives exactly
    /// what it gave in the batch. 37 rows (not whole tiles), 576 columns (a short last
    /// chunk), 5 activation rows.
    #[test]
    fn int_dot_matmul_is_the_float_matmul_of_rounded_activations() {
        let (n, k, t) = (37, 576, 5);
        let cpu = Cpu::new().with_int_dot(None);
        let x: Vec<f32> = (0..t * k)
            .map(|i| (i * 31 % 97) as f32 / 97.0 - 0.5)
            .collect();
        for (bits, tol) in [(ActBits::Eight, 2e-2), (ActBits::Sixteen, 2e-4)] {
            let int = Cpu::new().with_int_dot(Some(bits));
            let q = qdot::IntActs::quantize(&x, k, bits);
            let rounded: Vec<f32> = (0..t * k).map(|i| q.value(i / k, i % k)).collect();
            for w in weights(n, k) {
                if !qdot::supports(&w) {
                    continue;
                }
                let name = format!("{} {bits:?}", w.format_name());
                let mut packed = w.clone();
                int.prepare_weight(&mut packed).unwrap();
                assert!(packed.packed_rows16().is_some(), "{name}");
                let matmul = |be: &Cpu, x: &[f32], w: &Weight| {
                    let mut out = Tensor::zeros(x.len() / k * n);
                    be.matmul(&Tensor::from(x), w, None, &mut out).unwrap();
                    out.to_vec().unwrap()
                };
                let a = matmul(&cpu, &x, &w);
                let b = matmul(&int, &x, &packed);
                let c = matmul(&cpu, &rounded, &w);
                let scale = a.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                for ((p, q), r) in a.iter().zip(&b).zip(&c) {
                    assert!((p - q).abs() <= tol * scale, "{name}: {p} vs {q}");
                    assert!(
                        (r - q).abs() <= 1e-5 * scale,
                        "{name}: {q} vs {r} (rounded x)"
                    );
                }
                let alone = matmul(&int, &x[2 * k..3 * k], &packed);
                assert_eq!(alone, b[2 * n..3 * n].to_vec(), "{name}");
                // Without integer dots, the packed weight gives what the original gives.
                let c = matmul(&cpu, &x, &packed);
                for (p, r) in a.iter().zip(&c) {
                    assert!(
                        (p - r).abs() <= 1e-5 * scale,
                        "{name}: {p} vs {r} (float, packed)"
                    );
                }
            }
        }
    }

    /// Dense rows of odd lengths exercise the vector tails.
    #[test]
    fn dense_rows_with_odd_lengths() {
        for cols in [1usize, 7, 17, 33, 100] {
            let x: Vec<f32> = (0..cols).map(|i| i as f32 * 0.01 - 0.2).collect();
            for w in weights(3, cols) {
                let mut row = vec![0f32; cols];
                w.row_to_f32(1, &mut row);
                for isa in Isa::all_supported() {
                    let mut fused = [0f32];
                    dot_weight_rows(isa, &x, &w, 1, &mut fused);
                    assert_eq!(fused[0].to_bits(), simd::dot(isa, &x, &row).to_bits());
                }
            }
        }
    }

    /// One sequence's first token, in slot 0.
    fn first_token_batch() -> BatchLayout {
        BatchLayout {
            positions: vec![0],
            slot_mapping: vec![0],
            seq_offsets: vec![0, 1],
            block_tables: vec![vec![0]],
            context_lens: vec![1],
        }
    }

    /// Degenerate heads (no values, or no query heads) attend to nothing instead of
    /// panicking on a zero-width split.
    #[test]
    fn attention_of_empty_heads_is_a_no_op() {
        let batch = first_token_batch();
        let cpu = Cpu::new();
        let (q, mut out) = (Tensor::zeros(0), Tensor::zeros(0));
        let cache = KvLayer::new(1, 16, 1, 0, KvDtype::F32);
        cpu.attention(&q, &cache, &batch, 2, &mut out).unwrap();
        let cache = KvLayer::new(1, 16, 1, 64, KvDtype::F32);
        cpu.attention(&q, &cache, &batch, 0, &mut out).unwrap();
    }

    /// K and V pools can be replaced (`KvLayer::pools_mut`): one of the wrong dtype, length
    /// or int8 grouping is an error that names them, not a panic inside a kernel.
    #[test]
    fn mismatched_kv_pools_are_an_error() {
        let batch = first_token_batch();
        let cpu = Cpu::new();
        let (q, mut out) = (Tensor::from(vec![0.5f32; 64]), Tensor::zeros(64));
        let mut cache = KvLayer::new(1, 16, 1, 64, KvDtype::F16);
        cpu.attention(&q, &cache, &batch, 1, &mut out).unwrap();
        *cache.pools_mut().unwrap().1 = KvData::zeros(KvDtype::F32, 1024, 64);
        let err = cpu.attention(&q, &cache, &batch, 1, &mut out).unwrap_err();
        assert!(err.to_string().contains("V 1024 f32"), "{err}");
        let err = cpu.write_kv(&mut cache, &q, &q, &[0]).unwrap_err();
        assert!(err.to_string().contains("kv cache"), "{err}");
        *cache.pools_mut().unwrap().1 = KvData::zeros(KvDtype::F16, 10, 64);
        assert!(cpu.attention(&q, &cache, &batch, 1, &mut out).is_err());

        // Int8 pools whose scale groups do not split the heads (or miscount) are refused.
        let mut cache = KvLayer::new(1, 16, 1, 64, KvDtype::Int8);
        cpu.write_kv(&mut cache, &q, &q, &[0]).unwrap();
        cpu.attention(&q, &cache, &batch, 1, &mut out).unwrap();
        for (group, scales) in [(48, 1024 / 48 + 1), (32, 3)] {
            *cache.pools_mut().unwrap().1 = KvData::Int8 {
                codes: vec![0; 1024],
                scales: vec![0.0; scales],
                group,
            };
            let err = cpu.write_kv(&mut cache, &q, &q, &[0]).unwrap_err();
            assert!(err.to_string().contains("int8 pool"), "{err}");
            assert!(cpu.attention(&q, &cache, &batch, 1, &mut out).is_err());
        }
    }
}
