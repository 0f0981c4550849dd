//! The paged KV cache storage of one layer and the ragged batch layout that drives
//! attention on every backend (DESIGN.md, "Data flow of one step").

use half::f16;
use half::slice::HalfFloatSliceExt;
use half::vec::HalfBitsVecExt;
use std::any::Any;
use std::sync::{Arc, OnceLock};

/// The element type of a KV cache. F16, the default (as in llama.cpp; vLLM keeps the
/// model's 16-bit dtype), halves the bytes every decode step reads per cached position (at
/// long contexts as many as the weights) and doubles the tokens a pool holds. Each K and V
/// value is rounded to f16 once, when written; attention computes in f32. Measured on
/// SmolLM2-135M (README): perplexity +0.001% to +0.007%, log-probabilities within ~2.5e-3 of
/// f32's. F32 keeps the exact values, for checks against f32 references. Int8 (opt-in)
/// stores a token's values as symmetric int8 codes with an f32 scale per [`int8_group`]
/// values of a head (max |x| / 127, round to nearest): ~half an f16 cache's bytes again,
/// at a measured cost in accuracy (README, "Quantization accuracy").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    F32,
    #[default]
    F16,
    Int8,
}

impl KvDtype {
    pub fn parse(s: &str) -> Option<KvDtype> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Some(KvDtype::F32),
            "f16" => Some(KvDtype::F16),
            "int8" | "i8" => Some(KvDtype::Int8),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Int8 => "int8",
        }
    }

    /// Bytes one token's K (or V) takes in one layer: its values and, in int8, their
    /// scales.
    pub fn slot_bytes(self, n_kv_heads: usize, head_dim: usize) -> usize {
        let values = n_kv_heads * head_dim;
        match self {
            KvDtype::F32 => 4 * values,
            KvDtype::F16 => 2 * values,
            KvDtype::Int8 => values + 4 * values / int8_group(head_dim),
        }
    }
}

/// The values of one layer's K or V pool, in the cache's [`KvDtype`].
#[derive(Debug, Clone, PartialEq)]
pub enum KvData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    /// Value `i` is `codes[i] as f32 * scales[i / group]`: a scale per [`int8_group`]
    /// values of one head of a token.
    Int8 {
        codes: Vec<i8>,
        scales: Vec<f32>,
        group: usize,
    },
}

impl KvData {
    /// A pool of `n` zeros, for heads of `head_dim` values (which divides `n`).
    pub fn zeros(dtype: KvDtype, n: usize, head_dim: usize) -> KvData {
        match dtype {
            KvDtype::F32 => KvData::F32(vec![0.0; n]),
            // Zeroed u16s come from the allocator's zeroed pages, mapped on first write as
            // f32's are, instead of a memset of the whole pool at start-up.
            KvDtype::F16 => KvData::F16(vec![0u16; n].reinterpret_into()),
            KvDtype::Int8 => {
                let group = int8_group(head_dim);
                KvData::Int8 {
                    codes: vec![0; n],
                    scales: vec![0.0; n.div_ceil(group)],
                    group,
                }
            }
        }
    }

    pub fn dtype(&self) -> KvDtype {
        match self {
            KvData::F32(_) => KvDtype::F32,
            KvData::F16(_) => KvDtype::F16,
            KvData::Int8 { .. } => KvDtype::Int8,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            KvData::F32(v) => v.len(),
            KvData::F16(v) => v.len(),
            KvData::Int8 { codes, .. } => codes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stores `values` from element `at`, rounded to nearest in an f16 pool. A finite value
    /// beyond f16's range (±65504) saturates there instead of becoming infinite (which
    /// would turn the attention over it into NaN), with a warning, once per process, that
    /// this model wants an f32 cache. An int8 pool quantizes whole groups: `at` and the
    /// length are multiples of its `group`.
    pub fn write(&mut self, at: usize, values: &[f32]) {
        let range = at..at + values.len();
        match self {
            KvData::F32(v) => v[range].copy_from_slice(values),
            KvData::F16(v) => {
                let out = &mut v[range];
                out.convert_from_f32_slice(values);
                if out.iter().any(|x| x.is_infinite()) {
                    saturate(out, values);
                }
            }
            KvData::Int8 {
                codes,
                scales,
                group,
            } => {
                let g = *group;
                assert!(
                    at.is_multiple_of(g) && values.len().is_multiple_of(g),
                    "an int8 KV pool is written in whole groups"
                );
                let groups = codes[range].chunks_exact_mut(g).zip(values.chunks_exact(g));
                for ((codes, values), scale) in groups.zip(&mut scales[at / g..]) {
                    *scale = quantize_group(values, codes);
                }
            }
        }
    }

    /// Every value as f32 (exact from f16, `code · scale` from int8): for backends and
    /// tests that work on f32 pools.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len()];
        self.read(0, &mut out);
        out
    }

    /// The pool's storage as bytes, one slice per array (the values; an int8 pool's codes,
    /// then its scales), each laid out slot after slot: what a device copy holds.
    pub fn planes(&self) -> Vec<&[u8]> {
        fn bytes<T: Copy>(v: &[T]) -> &[u8] {
            // SAFETY: f32, f16 and i8 have no padding and every byte is initialized.
            unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
        }
        match self {
            KvData::F32(v) => vec![bytes(v)],
            KvData::F16(v) => vec![bytes(v)],
            KvData::Int8 { codes, scales, .. } => vec![bytes(codes), bytes(scales)],
        }
    }

    /// [`KvData::planes`], to write (a device copy's values brought back).
    pub fn planes_mut(&mut self) -> Vec<&mut [u8]> {
        fn bytes<T: Copy>(v: &mut [T]) -> &mut [u8] {
            // SAFETY: as in `planes`; and every byte pattern is a valid f32, f16 or i8.
            unsafe {
                std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v))
            }
        }
        match self {
            KvData::F32(v) => vec![bytes(v)],
            KvData::F16(v) => vec![bytes(v)],
            KvData::Int8 { codes, scales, .. } => vec![bytes(codes), bytes(scales)],
        }
    }

    /// Values `at..at + out.len()` as f32, as [`KvData::to_f32`] gives them. An int8 pool
    /// reads whole groups (`at` and the length multiples of its `group`).
    pub fn read(&self, at: usize, out: &mut [f32]) {
        let range = at..at + out.len();
        match self {
            KvData::F32(v) => out.copy_from_slice(&v[range]),
            KvData::F16(v) => v[range].convert_to_f32_slice(out),
            KvData::Int8 {
                codes,
                scales,
                group,
            } => {
                let g = *group;
                assert!(
                    at.is_multiple_of(g) && out.len().is_multiple_of(g),
                    "an int8 KV pool is read in whole groups"
                );
                let groups = codes[range].chunks_exact(g).zip(&scales[at / g..]);
                for ((codes, &scale), out) in groups.zip(out.chunks_exact_mut(g)) {
                    for (o, &c) in out.iter_mut().zip(codes) {
                        *o = c as f32 * scale;
                    }
                }
            }
        }
    }

    fn copy_within(&mut self, src: std::ops::Range<usize>, dst: usize) {
        match self {
            KvData::F32(v) => v.copy_within(src, dst),
            KvData::F16(v) => v.copy_within(src, dst),
            KvData::Int8 {
                codes,
                scales,
                group,
            } => {
                let g = *group;
                scales.copy_within(src.start / g..src.end / g, dst / g);
                codes.copy_within(src, dst);
            }
        }
    }
}

/// Values per scale in an int8 KV pool with heads of `head_dim`: 32 (as llama.cpp's q8_0
/// cache), or the largest power of two below it that divides the head (16 for heads of
/// 48 or 80). A power of two, so kernels find a value's scale with a shift, not a division
/// (attention at 16 sequences × 256 positions, hot caches: a division per group took 1.44x
/// f16's time, a shift 0.96–1.16x).
/// Measured on SmolLM2 (heads of 64, tests/golden.rs and README): one scale per head moved
/// perplexity by +0.24% and greedy log-probabilities by up to 0.24 against transformers';
/// one per 32 values, +0.03% and 0.094, for 1/8 more bytes.
pub fn int8_group(head_dim: usize) -> usize {
    1 << head_dim.trailing_zeros().min(5)
}

/// One group's values as symmetric int8 `codes`; returns their scale (max |x| / 127, so
/// the largest maps to ±127). A group with a NaN or infinite value gets a NaN scale: it
/// reads back as NaN, as it would have made the attention over it with a wider cache.
fn quantize_group(values: &[f32], codes: &mut [i8]) -> f32 {
    // A NaN, once met, stays the maximum (`a > m` is false from then on).
    let amax = values
        .iter()
        .map(|x| x.abs())
        .fold(0f32, |m, a| if a > m || a.is_nan() { a } else { m });
    if amax == 0.0 || !amax.is_finite() {
        codes.fill(0);
        return if amax == 0.0 { 0.0 } else { f32::NAN };
    }
    let inv = 127.0 / amax;
    for (c, &x) in codes.iter_mut().zip(values) {
        // |x · inv| <= 127 up to a rounding: the clamp only catches that rounding.
        *c = (x * inv).round().clamp(-127.0, 127.0) as i8;
    }
    amax / 127.0
}

/// Replaces the infinities that finite `values` rounded to in `out` by ±f16::MAX.
fn saturate(out: &mut [f16], values: &[f32]) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    for (o, &x) in out.iter_mut().zip(values) {
        if o.is_infinite() && x.is_finite() {
            *o = if x > 0.0 { f16::MAX } else { f16::MIN };
            WARNED.call_once(|| {
                tracing::warn!(
                    "a K/V value ({x}) is beyond the f16 KV cache's range: saturated to \
                     ±65504; use an f32 KV cache (--kv-dtype f32) for this model"
                )
            });
        }
    }
}

/// A backend's device copy of a layer's pools, opaque to everything else, which can bring
/// its values back to the host.
pub trait DevicePools: Any + Send + Sync {
    /// Copies the device pools into `k` and `v` (which have their shape and dtype).
    fn download(&self, k: &mut KvData, v: &mut KvData) -> crate::Result<()>;
    /// Copies slots `src..src + slots` of every device pool to `dst..dst + slots` (ranges
    /// that do not overlap), queued like a launch.
    fn copy_slots(&self, src: usize, dst: usize, slots: usize) -> crate::Result<()>;
    fn as_any(&self) -> &dyn Any;
}

/// One layer's paged K and V storage: `[num_blocks, block_size, n_kv_heads, head_dim]` each.
/// Which blocks belong to which sequence is the engine's business (block tables).
///
/// The pools live on the host and, once a backend with device memory has used them, in its
/// device copy too. That backend writes new slots on the device only: the host pools go
/// stale (`host_stale`) until something reads them there ([`KvLayer::host_pools`],
/// [`KvLayer::pools_mut`], [`KvLayer::try_clone`]), which brings the values back first.
/// A change on the host drops the device copy, and the backend rebuilds it when it next
/// needs it; [`KvLayer::copy_block`] copies on both sides instead (or on the device alone
/// while only it holds the values).
#[derive(Debug)]
pub struct KvLayer {
    pub(crate) k: KvData,
    pub(crate) v: KvData,
    pub num_blocks: usize,
    pub block_size: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub(crate) device: OnceLock<Arc<dyn DevicePools>>,
    /// Whether only the device copy holds the current values (it then exists).
    host_stale: bool,
}

impl std::fmt::Debug for dyn DevicePools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DevicePools")
    }
}

impl KvLayer {
    pub fn new(
        num_blocks: usize,
        block_size: usize,
        n_kv_heads: usize,
        head_dim: usize,
        dtype: KvDtype,
    ) -> Self {
        let n = num_blocks * block_size * n_kv_heads * head_dim;
        KvLayer {
            k: KvData::zeros(dtype, n, head_dim),
            v: KvData::zeros(dtype, n, head_dim),
            num_blocks,
            block_size,
            n_kv_heads,
            head_dim,
            device: OnceLock::new(),
            host_stale: false,
        }
    }

    pub fn dtype(&self) -> KvDtype {
        self.k.dtype()
    }

    /// The K and V pools on the host, brought back from the device first if only it holds
    /// the current values.
    pub fn host_pools(&mut self) -> crate::Result<(&KvData, &KvData)> {
        self.sync_host()?;
        Ok((&self.k, &self.v))
    }

    /// The K and V pools, to change directly (tests, benches): brought back from the device
    /// first if need be, and any device copy dropped.
    pub fn pools_mut(&mut self) -> crate::Result<(&mut KvData, &mut KvData)> {
        self.drop_device_copy()?;
        Ok((&mut self.k, &mut self.v))
    }

    /// A copy with the current values on the host (and no device copy).
    pub fn try_clone(&self) -> crate::Result<KvLayer> {
        let mut copy = KvLayer {
            k: self.k.clone(),
            v: self.v.clone(),
            device: OnceLock::new(),
            host_stale: false,
            ..*self
        };
        if self.host_stale {
            self.stale_copy().download(&mut copy.k, &mut copy.v)?;
        }
        Ok(copy)
    }

    /// Brings the device copy's values back to the host pools if only it holds them.
    pub fn sync_host(&mut self) -> crate::Result<()> {
        if self.host_stale {
            let copy = self.stale_copy().clone();
            copy.download(&mut self.k, &mut self.v)?;
            self.host_stale = false;
        }
        Ok(())
    }

    /// Whether only the device copy holds the current values.
    pub fn host_is_stale(&self) -> bool {
        self.host_stale
    }

    /// Says that the device copy's owner wrote new values there: the host pools are stale
    /// until [`KvLayer::sync_host`]. Without a device copy, nothing changes.
    pub(crate) fn mark_written_on_device(&mut self) {
        self.host_stale |= self.device.get().is_some();
    }

    /// Drops the device copy, its values brought back to the host first.
    pub(crate) fn drop_device_copy(&mut self) -> crate::Result<()> {
        self.sync_host()?;
        self.device = OnceLock::new();
        Ok(())
    }

    fn stale_copy(&self) -> &Arc<dyn DevicePools> {
        // Invariant (see `host_stale`): stale host pools imply a device copy.
        self.device
            .get()
            .expect("stale host pools have a device copy")
    }

    /// Stores token `t`'s K and V rows (`slot_width` values each) in slot
    /// `slot_mapping[t]` of the host pools, as every backend stores them (rounded to f16,
    /// or quantized to int8), but for `PAD_SLOT`s. The caller has dropped any device copy.
    pub(crate) fn store_slots(&mut self, k: &[f32], v: &[f32], slot_mapping: &[u32]) {
        let w = self.slot_width();
        for (t, &slot) in slot_mapping.iter().enumerate() {
            if slot == crate::PAD_SLOT {
                continue;
            }
            let (at, row) = (slot as usize * w, t * w..(t + 1) * w);
            self.k.write(at, &k[row.clone()]);
            self.v.write(at, &v[row]);
        }
    }

    /// Values per token slot (all KV heads).
    pub fn slot_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Copies one whole block's K and V to another (copy-on-write): in the device copy, if
    /// there is one, and on the host unless only the device holds the values (the host
    /// stays stale then), so that a parallel sample's fork costs no round trip.
    pub fn copy_block(&mut self, src: usize, dst: usize) -> crate::Result<()> {
        let slots = self.block_size;
        if let Some(device) = self.device.get() {
            device.copy_slots(src * slots, dst * slots, slots)?;
            if self.host_stale {
                return Ok(());
            }
        }
        let w = slots * self.slot_width();
        self.k.copy_within(src * w..(src + 1) * w, dst * w);
        self.v.copy_within(src * w..(src + 1) * w, dst * w);
        Ok(())
    }
}

/// The ragged batch metadata of one step: never padded, but for a recorded decode step's
/// padding sequences (see `graph`), whose slot is `PAD_SLOT`.
///
/// Sequence `b` contributes query tokens `seq_offsets[b]..seq_offsets[b+1]`; each token at
/// `positions[t]` attends to its sequence's cached positions `0..=positions[t]`, found through
/// `block_tables[b]`. A prefill chunk and a decode are the same thing here.
#[derive(Debug, Clone, Default)]
pub struct BatchLayout {
    pub positions: Vec<u32>,
    pub slot_mapping: Vec<u32>,
    pub seq_offsets: Vec<usize>,
    pub block_tables: Vec<Vec<u32>>,
    pub context_lens: Vec<usize>,
}

impl BatchLayout {
    pub fn num_tokens(&self) -> usize {
        self.positions.len()
    }

    pub fn num_seqs(&self) -> usize {
        self.seq_offsets.len().saturating_sub(1)
    }

    /// The block tables as one row-major `[seqs, width]` array (rows padded with block 0,
    /// never read past a sequence's context), and `width`: what a GPU kernel indexes.
    pub fn flat_block_tables(&self) -> (Vec<u32>, usize) {
        let width = self.block_tables.iter().map(Vec::len).max().unwrap_or(0);
        let width = width.max(1);
        (self.block_tables_with_width(width), width)
    }

    /// The block tables as one row-major `[seqs, width]` array, padded as above; `width`
    /// must be at least the longest table's (a recorded step's is fixed, see `graph`).
    pub fn block_tables_with_width(&self, width: usize) -> Vec<u32> {
        let mut flat = vec![0u32; self.num_seqs() * width];
        for (s, table) in self.block_tables.iter().take(self.num_seqs()).enumerate() {
            let n = table.len().min(width);
            flat[s * width..s * width + n].copy_from_slice(&table[..n]);
        }
        flat
    }

    /// The sequence of each query token.
    pub fn seq_of_token(&self) -> Vec<u32> {
        let mut seq_of = vec![0u32; self.num_tokens()];
        for s in 0..self.num_seqs() {
            seq_of[self.seq_offsets[s]..self.seq_offsets[s + 1]].fill(s as u32);
        }
        seq_of
    }

    /// Checks internal consistency against a cache; an inconsistent layout is an engine bug,
    /// reported as an error instead of an out-of-bounds panic inside a kernel.
    pub fn validate(&self, cache: &KvLayer) -> crate::Result<()> {
        let t = self.num_tokens();
        let op = "batch layout";
        crate::check(op, self.slot_mapping.len() == t, || {
            format!("{} slots for {t} tokens", self.slot_mapping.len())
        })?;
        crate::check(op, self.seq_offsets.first() == Some(&0), || {
            "seq_offsets must start at 0".into()
        })?;
        crate::check(op, self.seq_offsets.last() == Some(&t), || {
            format!("seq_offsets must end at {t}")
        })?;
        let b = self.num_seqs();
        crate::check(
            op,
            self.block_tables.len() == b && self.context_lens.len() == b,
            || format!("{b} sequences but {} block tables", self.block_tables.len()),
        )?;
        for s in 0..b {
            let (lo, hi) = (self.seq_offsets[s], self.seq_offsets[s + 1]);
            crate::check(op, lo <= hi, || "seq_offsets must not decrease".into())?;
            let needed = self.context_lens[s].div_ceil(cache.block_size);
            crate::check(op, self.block_tables[s].len() >= needed, || {
                format!(
                    "sequence {s}: {} blocks for {} tokens",
                    self.block_tables[s].len(),
                    self.context_lens[s]
                )
            })?;
            for &blk in &self.block_tables[s] {
                crate::check(op, (blk as usize) < cache.num_blocks, || {
                    format!("block {blk} outside a pool of {}", cache.num_blocks)
                })?;
            }
            for t in lo..hi {
                crate::check(
                    op,
                    (self.positions[t] as usize) < self.context_lens[s],
                    || {
                        format!(
                            "position {} beyond context {}",
                            self.positions[t], self.context_lens[s]
                        )
                    },
                )?;
            }
        }
        for &slot in &self.slot_mapping {
            let in_pool = slot == crate::PAD_SLOT || (slot as usize) < cache.num_slots();
            crate::check(op, in_pool, || {
                format!("slot {slot} outside a pool of {}", cache.num_slots())
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An f16 pool stores each value rounded to nearest (ties to even), saturating finite
    /// values beyond its range, and reads it back exactly; copy-on-write moves whole blocks
    /// in either dtype.
    #[test]
    fn f16_pools_round_on_write_and_copy_blocks() {
        let mut layer = KvLayer::new(2, 2, 1, 2, KvDtype::F16);
        assert_eq!(layer.dtype(), KvDtype::F16);
        // 1 + 2^-11 is halfway between two f16s (1 and 1 + 2^-10): ties to even, to 1.
        let values = [1.0 + 1.0 / 2048.0, 1.0 + 3.0 / 2048.0, -0.1, 70000.0];
        layer.k.write(0, &values);
        let back = layer.k.to_f32();
        assert_eq!(back[0], 1.0);
        assert_eq!(back[1], 1.0 + 2.0 / 1024.0);
        assert_eq!(back[2], f16::from_f32(-0.1).to_f32());
        assert!(back[2] != -0.1 && (back[2] + 0.1).abs() < 1e-4);
        assert_eq!(back[3], 65504.0, "saturated at f16's largest");
        layer.k.write(1, &[-1e9, f32::INFINITY, f32::NAN]);
        let back = layer.k.to_f32();
        assert_eq!(back[1], -65504.0);
        assert_eq!(back[2], f32::INFINITY, "an infinite value stays what it is");
        assert!(back[3].is_nan());
        layer.k.write(0, &values);
        let back = layer.k.to_f32();
        layer.copy_block(0, 1).unwrap();
        assert_eq!(layer.k.to_f32()[4..], back[..4]);
        assert_eq!(layer.v.to_f32(), vec![0.0; 8]);

        let mut wide = KvLayer::new(2, 2, 1, 2, KvDtype::F32);
        wide.v.write(0, &values);
        wide.copy_block(0, 1).unwrap();
        assert_eq!(wide.v.to_f32()[4..], values);
        assert_eq!(KvDtype::parse("F16"), Some(KvDtype::F16));
        assert_eq!(KvDtype::parse("bf16"), None);
        assert_eq!(KvDtype::default().slot_bytes(3, 64), 3 * 64 * 2);
    }

    /// An int8 pool holds each group as codes and a scale: every value read back within
    /// half a step (scale / 2) of what was written, the largest exact; a zero group stays
    /// zero, a non-finite value makes its group NaN (not a silent 0), and blocks copy with
    /// their scales. (Heads of 8: a group per head.)
    #[test]
    fn int8_pools_quantize_groups_and_copy_blocks_with_their_scales() {
        let (hd, n_kv) = (8, 2);
        let mut layer = KvLayer::new(2, 2, n_kv, hd, KvDtype::Int8);
        assert_eq!(layer.dtype(), KvDtype::Int8);
        let slot: Vec<f32> = (0..n_kv * hd).map(|i| (i as f32 - 5.5) * 0.37).collect();
        layer.k.write(0, &slot);
        let back = layer.k.to_f32();
        for (head, got) in slot.chunks(hd).zip(back.chunks(hd)) {
            let amax = head.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (x, y) in head.iter().zip(got) {
                assert!((x - y).abs() <= amax / 127.0 / 2.0 * 1.0001, "{x} vs {y}");
            }
            let i = head.iter().position(|x| x.abs() == amax).unwrap();
            assert!((got[i] - head[i]).abs() <= amax * 1e-6);
        }
        assert_eq!(back[n_kv * hd..], vec![0.0; 3 * n_kv * hd]);

        layer
            .k
            .write(n_kv * hd, &[[0.0; 8], [f32::NAN; 8]].concat());
        let back = layer.k.to_f32();
        assert!(back[n_kv * hd..(n_kv + 1) * hd].iter().all(|&x| x == 0.0));
        assert!(back[(n_kv + 1) * hd..(n_kv + 2) * hd]
            .iter()
            .all(|x| x.is_nan()));
        let mut inf = slot.clone();
        inf[3] = f32::INFINITY;
        layer.v.write(0, &inf);
        let v = layer.v.to_f32();
        assert!(v[..hd].iter().all(|x| x.is_nan()) && v[hd..2 * hd] == back[hd..2 * hd]);

        layer.k.write(0, &slot);
        // Block 0 holds the NaN group of slot 1 too: compared as bits.
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let first_block = bits(&layer.k.to_f32()[..2 * n_kv * hd]);
        layer.copy_block(0, 1).unwrap();
        assert_eq!(bits(&layer.k.to_f32()[2 * n_kv * hd..]), first_block);
        assert_eq!(KvDtype::parse("INT8"), Some(KvDtype::Int8));
        let groups = [8, 48, 80, 128, 6, 0].map(int8_group);
        assert_eq!(groups, [8, 16, 16, 32, 2, 32]);
    }

    /// A head of 64 is two groups of 32, each with its own scale: a small half beside a
    /// large one keeps its own resolution.
    #[test]
    fn int8_heads_of_64_have_a_scale_per_32_values() {
        let mut pool = KvData::zeros(KvDtype::Int8, 64, 64);
        let head: Vec<f32> = (0..64)
            .map(|i| {
                if i < 32 {
                    0.01 * i as f32
                } else {
                    50.0 - i as f32
                }
            })
            .collect();
        pool.write(0, &head);
        let back = pool.to_f32();
        for (half, amax) in [(0..32, 0.31f32), (32..64, 18.0)] {
            for i in half {
                let err = (back[i] - head[i]).abs();
                assert!(
                    err <= amax / 254.0 * 1.0001,
                    "[{i}] {} vs {}",
                    back[i],
                    head[i]
                );
            }
        }
        assert_eq!(KvDtype::Int8.slot_bytes(3, 64), 3 * 64 + 6 * 4);
        assert_eq!(KvDtype::Int8.slot_bytes(2, 8), 2 * 8 + 2 * 4);
    }
}
