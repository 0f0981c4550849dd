//! The paged KV cache storage of one layer and the ragged batch layout that drives
//! attention on every backend (DESIGN.md, "Data flow of one step").

/// One layer's paged K and V storage: `[num_blocks, block_size, n_kv_heads, head_dim]` each.
/// Which blocks belong to which sequence is the engine's business (block tables).
#[derive(Debug, Clone)]
pub struct KvLayer {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub num_blocks: usize,
    pub block_size: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayer {
    pub fn new(num_blocks: usize, block_size: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        let n = num_blocks * block_size * n_kv_heads * head_dim;
        KvLayer {
            k: vec![0.0; n],
            v: vec![0.0; n],
            num_blocks,
            block_size,
            n_kv_heads,
            head_dim,
        }
    }

    /// Floats per token slot (all KV heads).
    pub fn slot_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Copies one whole block's K and V to another (copy-on-write).
    pub fn copy_block(&mut self, src: usize, dst: usize) {
        let w = self.block_size * self.slot_width();
        self.k.copy_within(src * w..(src + 1) * w, dst * w);
        self.v.copy_within(src * w..(src + 1) * w, dst * w);
    }
}

/// The ragged (never padded) batch metadata of one step.
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
        let width = self
            .block_tables
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(0)
            .max(1);
        let mut flat = vec![0u32; self.num_seqs() * width];
        for (s, table) in self.block_tables.iter().enumerate() {
            flat[s * width..s * width + table.len()].copy_from_slice(table);
        }
        (flat, width)
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
            crate::check(op, (slot as usize) < cache.num_slots(), || {
                format!("slot {slot} outside a pool of {}", cache.num_slots())
            })?;
        }
        Ok(())
    }
}
