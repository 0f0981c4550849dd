//! Recorded decode steps (CUDA graphs): what the engine and a backend agree on to record one
//! step's ops once and replay them with the next step's inputs.
//!
//! A decode step of a small model is hundreds of short kernels; on a GPU their launch costs
//! can take longer than their work. A backend that can record them (`Backend::
//! begin_step_record`) replays a step as one launch. A replay reruns the same launches with
//! the same arguments, so everything a step's ops read from the host must either be the same
//! at every step of the shape (its [`GraphKey`]) or be one of the step's input arrays
//! ([`StepInputs::arrays`]), which a replay sends before it launches.
//!
//! Continuous batching changes a decode batch's size whenever a sequence joins or ends, and
//! each size would be a shape of its own, met once, recorded the next time, and holding
//! device memory. So a decode batch is padded up to one of a few sizes ([`padded_seqs`])
//! with sequences that change nothing: token 0 at position 0, attending to one slot of
//! block 0, its K and V written nowhere ([`PAD_SLOT`]), its row of log-probabilities
//! computed but never brought back. Every op treats rows independently, so the real rows'
//! values do not depend on the padding.

use crate::{BatchLayout, NO_TARGET};
use std::any::Any;

/// Block-table widths are rounded up to a multiple of this, so that a sequence growing by a
/// block keeps its graph (every 32 blocks it needs a wider one).
pub const TABLE_WIDTH_STEP: usize = 32;

/// The slot a padding sequence's K and V go to: none. Every backend's KV write skips it.
pub const PAD_SLOT: u32 = u32::MAX;

/// The decode batch size `seqs` sequences are padded to: 1, 2, 4, then multiples of 8
/// (at most 7 padding rows, a small part of a step that reads every weight).
pub fn padded_seqs(seqs: usize) -> usize {
    match seqs {
        0..=2 => seqs,
        3..=4 => 4,
        _ => seqs.next_multiple_of(8),
    }
}

/// The shape of a recorded step: steps with equal keys replay one recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GraphKey {
    /// Sequences, one token each.
    pub seqs: usize,
    /// Key splits of the attention (flash-decoding), from the longest context.
    pub splits: u32,
    /// Columns of the block-table array (the longest table, rounded up).
    pub table_width: usize,
    /// Whether the step brings back picked rows (`Backend::pick_rows`), not whole ones.
    pub picks: bool,
}

/// What a decode step reads from the host: its tokens, their batch layout, and the rows of
/// log-probabilities it computes; the last `padding` sequences pad the batch, and their rows
/// are not returned.
#[derive(Clone, Copy)]
pub struct StepInputs<'a> {
    pub tokens: &'a [u32],
    pub batch: &'a BatchLayout,
    pub rows: &'a [u32],
    /// Each row's pick target (`Backend::pick_rows`); empty when the rows come back whole.
    pub targets: &'a [u32],
    pub padding: usize,
}

/// A decode step padded to a recorded size: [`StepInputs::padded`].
pub struct PaddedStep {
    tokens: Vec<u32>,
    batch: BatchLayout,
    rows: Vec<u32>,
    targets: Vec<u32>,
    padding: usize,
}

impl PaddedStep {
    pub fn inputs(&self) -> StepInputs<'_> {
        StepInputs {
            tokens: &self.tokens,
            batch: &self.batch,
            rows: &self.rows,
            targets: &self.targets,
            padding: self.padding,
        }
    }
}

impl StepInputs<'_> {
    /// Whether this is a decode step: one token per sequence, each returning its row of
    /// log-probabilities (all whole or all picked), in order. Only such steps are recorded
    /// (prefill chunks vary in length from step to step).
    pub fn is_decode(&self) -> bool {
        let b = self.batch;
        let n = self.tokens.len();
        n > 0
            && b.num_tokens() == n
            && b.num_seqs() == n
            && b.block_tables.len() == n
            && b.seq_offsets.iter().enumerate().all(|(i, &o)| o == i)
            && self.rows.iter().enumerate().all(|(i, &r)| r as usize == i)
            && self.rows.len() == n
            && (self.targets.is_empty() || self.targets.len() == n)
    }

    /// Rows of log-probabilities returned: those of the real sequences.
    pub fn returned_rows(&self) -> usize {
        self.rows.len().saturating_sub(self.padding)
    }

    /// This decode step with padding sequences (see the module's comment) up to `seqs`
    /// sequences; `None` if it is not a decode step or has more sequences already.
    pub fn padded(&self, seqs: usize) -> Option<PaddedStep> {
        let n = self.tokens.len();
        if !self.is_decode() || seqs < n {
            return None;
        }
        let b = self.batch;
        let pad = seqs - n;
        let more = |v: &[u32], with: u32| [v, &vec![with; pad]].concat();
        let mut block_tables = b.block_tables.clone();
        block_tables.resize(seqs, vec![0]);
        let mut context_lens = b.context_lens.clone();
        context_lens.resize(seqs, 1);
        Some(PaddedStep {
            tokens: more(self.tokens, 0),
            batch: BatchLayout {
                positions: more(&b.positions, 0),
                slot_mapping: more(&b.slot_mapping, PAD_SLOT),
                seq_offsets: (0..=seqs).collect(),
                block_tables,
                context_lens,
            },
            rows: (0..seqs as u32).collect(),
            targets: match self.targets {
                [] => vec![],
                t => more(t, NO_TARGET),
            },
            padding: self.padding + pad,
        })
    }

    /// The longest table, rounded up to [`TABLE_WIDTH_STEP`].
    pub fn table_width(&self) -> usize {
        let longest = self.batch.block_tables.iter().map(Vec::len).max();
        longest
            .unwrap_or(0)
            .max(1)
            .next_multiple_of(TABLE_WIDTH_STEP)
    }

    /// The arrays a step's ops send, by role, with the block tables `table_width` wide: the
    /// inputs a replay sends. A backend's ops must send exactly these (its recording checks
    /// that they do).
    pub fn arrays(&self, table_width: usize) -> Vec<(&'static str, Vec<u32>)> {
        let b = self.batch;
        let mut arrays = vec![
            ("tokens", self.tokens.to_vec()),
            ("positions", b.positions.clone()),
            ("slot_mapping", b.slot_mapping.clone()),
            ("seq_of_token", b.seq_of_token()),
            ("block_tables", b.block_tables_with_width(table_width)),
            ("gathered_rows", self.rows.to_vec()),
        ];
        if !self.targets.is_empty() {
            arrays.push(("pick_targets", self.targets.to_vec()));
        }
        arrays
    }
}

/// A step a backend recorded, to replay with `Backend::replay_step`.
pub trait RecordedStep: Send + Sync {
    /// Kernel launches it replays.
    fn launches(&self) -> usize;
    /// Device memory it holds (its activations, inputs and output), for a budget.
    fn bytes(&self) -> usize;
    fn as_any(&self) -> &dyn Any;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(contexts: &[usize]) -> BatchLayout {
        let n = contexts.len();
        BatchLayout {
            positions: contexts.iter().map(|&c| c as u32 - 1).collect(),
            slot_mapping: (0..n as u32).map(|s| s * 100 + 7).collect(),
            seq_offsets: (0..=n).collect(),
            block_tables: contexts
                .iter()
                .map(|&c| (10..10 + c.div_ceil(16) as u32).collect())
                .collect(),
            context_lens: contexts.to_vec(),
        }
    }

    #[test]
    fn only_one_token_per_sequence_with_every_row_in_order_is_a_decode_step() {
        let batch = decode(&[5, 40]);
        let tokens = [3, 4];
        let step = |rows: &[u32]| {
            StepInputs {
                tokens: &tokens,
                batch: &batch,
                rows,
                targets: &[],
                padding: 0,
            }
            .is_decode()
        };
        assert!(step(&[0, 1]));
        assert!(!step(&[1, 0]), "rows out of order");
        assert!(!step(&[0]), "a row missing");
        let mut prefill = decode(&[5, 40]);
        prefill.seq_offsets = vec![0, 2];
        let inputs = StepInputs {
            tokens: &tokens,
            batch: &prefill,
            rows: &[0, 1],
            targets: &[],
            padding: 0,
        };
        assert!(!inputs.is_decode(), "two tokens of one sequence");
        let some_picked = StepInputs {
            batch: &batch,
            targets: &[NO_TARGET],
            ..inputs
        };
        assert!(!some_picked.is_decode(), "rows whole and picked");
    }

    #[test]
    fn decode_batches_pad_to_1_2_4_then_multiples_of_8() {
        let sizes: Vec<usize> = [1, 2, 3, 4, 5, 8, 9, 17, 64, 65].map(padded_seqs).into();
        assert_eq!(sizes, [1, 2, 4, 4, 8, 8, 16, 24, 64, 72]);
    }

    #[test]
    fn padding_sequences_write_nowhere_and_return_no_row() {
        let batch = decode(&[5, 40, 3]);
        let inputs = StepInputs {
            tokens: &[3, 4, 5],
            batch: &batch,
            rows: &[0, 1, 2],
            targets: &[NO_TARGET, NO_TARGET, 7],
            padding: 0,
        };
        let padded = inputs.padded(padded_seqs(3)).unwrap();
        let p = padded.inputs();
        assert!(p.is_decode());
        assert_eq!((p.tokens, p.returned_rows()), (&[3, 4, 5, 0][..], 3));
        assert_eq!(p.batch.slot_mapping[3], PAD_SLOT);
        assert_eq!(p.batch.slot_mapping[..3], batch.slot_mapping[..]);
        assert_eq!(
            (
                p.batch.positions[3],
                p.batch.context_lens[3],
                &p.batch.block_tables[3]
            ),
            (0, 1, &vec![0])
        );
        assert_eq!(p.rows, [0, 1, 2, 3]);
        assert_eq!(p.targets, [NO_TARGET, NO_TARGET, 7, NO_TARGET]);
        assert!(
            inputs.padded(2).is_none(),
            "fewer sequences than the step's"
        );
    }

    #[test]
    fn arrays_pad_the_block_tables_to_the_rounded_width() {
        let batch = decode(&[5, 40]);
        let inputs = StepInputs {
            tokens: &[3, 4],
            batch: &batch,
            rows: &[0, 1],
            targets: &[],
            padding: 0,
        };
        assert_eq!(inputs.table_width(), TABLE_WIDTH_STEP);
        let arrays = inputs.arrays(inputs.table_width());
        let tables = &arrays.iter().find(|(r, _)| *r == "block_tables").unwrap().1;
        assert_eq!(tables.len(), 2 * TABLE_WIDTH_STEP);
        assert_eq!(tables[..2], [10, 0], "one block, then padding");
        assert_eq!(
            tables[TABLE_WIDTH_STEP..TABLE_WIDTH_STEP + 4],
            [10, 11, 12, 0]
        );
    }
}
