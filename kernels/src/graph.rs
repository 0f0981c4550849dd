//! Recorded decode steps (CUDA graphs): what the engine and a backend agree on to record one
//! step's ops once and replay them with the next step's inputs.
//!
//! A decode step of a small model is hundreds of short kernels; on a GPU their launch costs
//! can take longer than their work. A backend that can record them (`Backend::
//! begin_step_record`) replays a step as one launch. A replay reruns the same launches with
//! the same arguments, so everything a step's ops read from the host must either be the same
//! at every step of the shape (its [`GraphKey`]) or be one of the step's input arrays
//! ([`StepInputs::arrays`]), which a replay sends before it launches.

use crate::BatchLayout;
use std::any::Any;

/// Block-table widths are rounded up to a multiple of this, so that a sequence growing by a
/// block keeps its graph (every 32 blocks it needs a wider one).
pub const TABLE_WIDTH_STEP: usize = 32;

/// The shape of a recorded step: steps with equal keys replay one recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GraphKey {
    /// Sequences, one token each.
    pub seqs: usize,
    /// Key splits of the attention (flash-decoding), from the longest context.
    pub splits: u32,
    /// Columns of the block-table array (the longest table, rounded up).
    pub table_width: usize,
}

/// What a decode step reads from the host: its tokens, their batch layout, and the rows of
/// log-probabilities it returns.
pub struct StepInputs<'a> {
    pub tokens: &'a [u32],
    pub batch: &'a BatchLayout,
    pub rows: &'a [u32],
}

impl StepInputs<'_> {
    /// Whether this is a decode step: one token per sequence, each returning its row of
    /// log-probabilities, in order. Only such steps are recorded (prefill chunks vary in
    /// length from step to step).
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
        vec![
            ("tokens", self.tokens.to_vec()),
            ("positions", b.positions.clone()),
            ("slot_mapping", b.slot_mapping.clone()),
            ("seq_of_token", b.seq_of_token()),
            ("block_tables", b.block_tables_with_width(table_width)),
            ("gathered_rows", self.rows.to_vec()),
        ]
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
        };
        assert!(!inputs.is_decode(), "two tokens of one sequence");
    }

    #[test]
    fn arrays_pad_the_block_tables_to_the_rounded_width() {
        let batch = decode(&[5, 40]);
        let inputs = StepInputs {
            tokens: &[3, 4],
            batch: &batch,
            rows: &[0, 1],
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
