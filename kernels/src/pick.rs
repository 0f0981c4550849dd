//! Picked rows: what a greedy or scored row of log-probabilities needs, instead of the row.
//!
//! A step brings back a row of log-probabilities (the vocabulary, 196 KB for SmolLM2) per
//! sequence it samples and per prompt token it scores. Greedy decoding without penalties or
//! alternatives needs only the row's argmax and its value; a scored prompt token, only its
//! own value and whether it was the argmax. [`crate::Backend::pick_rows`] computes those where
//! the rows are (on a GPU: 8 bytes per row cross the bus, not the row).
//!
//! A draw within `top_k`, or a greedy row reporting alternatives, needs the row's most likely
//! tokens in the sampler's order ([`ranked`]); [`crate::Backend::top_rows`] ranks them where
//! the rows are, 8 bytes per candidate.

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

/// The first `k` (or all) of the row's tokens in order of `f32::total_cmp`, largest first,
/// ties by id, so the order is fully determined. Sorts one 64-bit key per token (value rank,
/// then id), not ids compared through the row, and selects before sorting when `k` is less
/// than the row: the sampler ranks a row per sampled token (`benches/cpu_ops.rs`,
/// `sample/…`). Every backend's `top_rows` follows it.
pub fn ranked(row: &[f32], k: usize) -> Vec<u32> {
    if k == 0 {
        return vec![]; // the common case of `top_k`: no key array for a whole vocabulary
    }
    let mut keys: Vec<u64> = row
        .iter()
        .enumerate()
        .map(|(i, &x)| (descending_rank(x) as u64) << 32 | i as u64)
        .collect();
    if k < keys.len() {
        keys.select_nth_unstable(k - 1);
        keys.truncate(k);
        keys.sort_unstable();
    } else if keys.len() < 1024 {
        keys.sort_unstable();
    } else {
        sort_by_rank(&mut keys);
    }
    keys.into_iter().map(|key| key as u32).collect()
}

/// Sorts keys built in id order by their rank (high 32 bits) alone, stably, so that ids stay
/// ascending within a rank: a radix sort, three passes of 11 bits (a 49,152-token draw took
/// 1.25 ms with a comparison sort of the keys, 0.88 ms with this).
fn sort_by_rank(keys: &mut Vec<u64>) {
    const BITS: u32 = 11;
    let mut sorted = vec![0u64; keys.len()];
    for shift in [32, 32 + BITS, 32 + 2 * BITS] {
        let digit = |key: u64| ((key >> shift) & ((1 << BITS) - 1)) as usize;
        let mut starts = [0usize; 1 << BITS];
        for &key in keys.iter() {
            starts[digit(key)] += 1;
        }
        let mut start = 0;
        for s in starts.iter_mut() {
            (*s, start) = (start, start + *s);
        }
        for &key in keys.iter() {
            let d = digit(key);
            sorted[starts[d]] = key;
            starts[d] += 1;
        }
        std::mem::swap(keys, &mut sorted);
    }
}

/// `x`'s place in the order of `f32::total_cmp`, reversed: smaller ranks are larger values
/// (`desc_rank` in norm.cu).
fn descending_rank(x: f32) -> u32 {
    let bits = x.to_bits();
    // total_cmp's order as an unsigned integer: negatives (sign bit set) reversed below the
    // positives.
    let ascending = if bits >> 31 == 1 {
        !bits
    } else {
        bits | 1 << 31
    };
    !ascending
}

/// Most candidates [`crate::Backend::top_rows`] reports per row: enough for `logprobs` (at
/// most 20) and the `top_k` of common sampling settings; larger asks bring the row back.
pub const MAX_RANKED: usize = 64;

/// The `k` most likely (index, value) pairs of a row, in [`ranked`] order.
pub fn top_pairs(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    ranked(row, k)
        .into_iter()
        .map(|i| (i, row[i as usize]))
        .collect()
}

/// `top_rows` on the host: `out[2k·i..2k·(i + 1)]` = the `k` best (value, index as f32)
/// pairs of row `rows[i]`, in [`ranked`] order.
pub(crate) fn top_rows_host(x: &[f32], width: usize, rows: &[u32], k: usize, out: &mut [f32]) {
    if k == 0 {
        return;
    }
    for (o, &r) in out.chunks_exact_mut(2 * k).zip(rows) {
        let row = &x[r as usize * width..(r as usize + 1) * width];
        for (pair, (i, v)) in o.chunks_exact_mut(2).zip(top_pairs(row, k)) {
            pair[0] = v;
            pair[1] = i as f32;
        }
    }
}

/// The (index, value) pairs of one row of `top_rows`' output.
pub fn ranked_pairs(values: &[f32]) -> Vec<(u32, f32)> {
    values
        .chunks_exact(2)
        .map(|p| (p[1] as u32, p[0]))
        .collect()
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

    /// Rows with ties, both zeros, infinities and NaNs of both signs; short ones, and long
    /// ones that take the radix sort.
    fn awkward_rows() -> Vec<Vec<f32>> {
        let mut state = 3u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let specials = [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            -1.5,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE / 2.0,
        ];
        (0..40)
            .map(|r| {
                let n = if r % 8 == 7 {
                    1000 + r * 300
                } else {
                    1 + r * 7
                };
                (0..n)
                    .map(|_| match next() % 4 {
                        0 => specials[(next() % specials.len() as u64) as usize],
                        // few distinct values: many ties
                        1 => -((next() % 4) as f32),
                        _ => -((next() % 12_000) as f32) / 1000.0,
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn ranking_follows_total_cmp_then_id() {
        for row in awkward_rows() {
            let mut want: Vec<u32> = (0..row.len() as u32).collect();
            want.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
            assert_eq!(ranked(&row, row.len()), want, "{row:?}");
            for k in [0, 1, 2, 5, row.len() + 3] {
                let k_want = &want[..k.min(row.len())];
                assert_eq!(ranked(&row, k), k_want, "k = {k}: {row:?}");
            }
        }
    }

    #[test]
    fn top_rows_are_the_ranked_pairs_of_the_rows_asked() {
        let x = [-3.0, -0.5, -2.0, -0.5, -9.0, f32::NAN];
        let mut out = [0f32; 8];
        top_rows_host(&x, 3, &[1, 0], 2, &mut out);
        let bits = |v: &[(u32, f32)]| v.iter().map(|&(i, x)| (i, x.to_bits())).collect::<Vec<_>>();
        // NaN ranks first, as in `f32::total_cmp` (the sampler's order).
        assert_eq!(
            bits(&ranked_pairs(&out[..4])),
            bits(&[(2, f32::NAN), (0, -0.5)])
        );
        assert_eq!(ranked_pairs(&out[4..]), [(1, -0.5), (2, -2.0)]);
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
