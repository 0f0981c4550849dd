//! Picked rows: what a greedy or scored row of log-probabilities needs, instead of the row.
//!
//! A step brings back a row of log-probabilities (the vocabulary, 196 KB for SmolLM2) per
//! sequence it samples and per prompt token it scores. Greedy decoding without penalties or
//! alternatives needs only the row's argmax and its value; a scored prompt token, only its
//! own value and whether it was the argmax. [`crate::Backend::pick_rows`] computes those where
//! the rows are (on a GPU: 8 bytes per row cross the bus, not the row).

/// A row picked without a target: its value is that of its argmax.
pub const NO_TARGET: u32 = u32::MAX;

/// Widest row whose argmax `pick_rows` reports exactly (as an f32).
pub const MAX_PICK_WIDTH: usize = 1 << 24;

/// One picked row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    /// The row's value at its target, or at its argmax (`NO_TARGET`).
    pub logprob: f32,
    /// The first index of the row's largest value (see [`argmax`]).
    pub argmax: u32,
}

impl Pick {
    /// The picks of `pick_rows`' output (`[rows, 2]`: value, index).
    pub fn from_values(values: &[f32]) -> Vec<Pick> {
        let pick = |v: &[f32]| Pick {
            logprob: v[0],
            argmax: v[1] as u32,
        };
        values.chunks_exact(2).map(pick).collect()
    }
}

/// The first index of the largest value of `v`: NaN never wins; a row without a value above
/// -inf gives 0. Every backend's `pick_rows` follows it, and so does the greedy sampler.
pub fn argmax(v: &[f32]) -> u32 {
    // Two passes that vectorize (it runs once per sequence per step over the whole
    // vocabulary): the largest value, then its first index.
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    if max == f32::NEG_INFINITY {
        return 0;
    }
    v.iter().position(|&x| x == max).unwrap_or(0) as u32
}

/// The pick of one row: its value at `target` (at its argmax for `NO_TARGET`; `target`
/// within the row) and its argmax.
pub fn pick(row: &[f32], target: u32) -> Pick {
    let argmax = argmax(row);
    let at = if target == NO_TARGET { argmax } else { target };
    Pick {
        logprob: row[at as usize],
        argmax,
    }
}

/// `pick_rows` on the host: `out[2r..2r + 2]` = (value, argmax as f32) of row `r`.
pub(crate) fn pick_rows_host(x: &[f32], width: usize, targets: &[u32], out: &mut [f32]) {
    let rows = x.chunks_exact(width);
    for ((o, row), &t) in out.chunks_exact_mut(2).zip(rows).zip(targets) {
        let p = pick(row, t);
        o[0] = p.logprob;
        o[1] = p.argmax as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorized argmax equals a plain first-maximum scan, ties and NaN included.
    #[test]
    fn argmax_is_the_first_largest_value() {
        let plain = |v: &[f32]| {
            let (mut best, mut value) = (0u32, f32::NEG_INFINITY);
            for (i, &x) in v.iter().enumerate() {
                if x > value {
                    (best, value) = (i as u32, x);
                }
            }
            best
        };
        for n in [1usize, 15, 16, 17, 100, 49_152] {
            let mut v: Vec<f32> = (0..n).map(|i| -(((i * 7919) % 1013) as f32)).collect();
            assert_eq!(argmax(&v), plain(&v), "n {n}");
            v[n / 2] = f32::NAN;
            let last = n - 1;
            v[last] = 5.0;
            assert_eq!(argmax(&v), plain(&v), "n {n} with NaN");
            v[n / 3] = 5.0; // a tie: the first one wins
            assert_eq!(argmax(&v), plain(&v), "n {n} tie");
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NAN]), 0);
    }

    #[test]
    fn a_pick_is_the_target_value_or_the_argmax_value() {
        let x = [-3.0, -0.5, -2.0, -0.1, -9.0, -0.1];
        let mut out = [0f32; 4];
        pick_rows_host(&x, 3, &[2, NO_TARGET], &mut out);
        let picks = Pick::from_values(&out);
        assert_eq!(
            picks[0],
            Pick {
                logprob: -2.0,
                argmax: 1
            }
        );
        assert_eq!(
            picks[1],
            Pick {
                logprob: -0.1,
                argmax: 0
            }
        );
    }
}
