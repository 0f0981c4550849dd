//! Sampling parameters, their validation, and the sampler that turns a row of
//! log-probabilities into a token.

use crate::error::{EngineError, Result};
pub use vellum_kernels::pick::argmax;

/// How to pick tokens. `Default` is greedy decoding of up to 16 tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: i64,
    /// In (0, 1]; 1 disables top-p.
    pub top_p: f32,
    /// In [0, 1]; 0 disables min-p.
    pub min_p: f32,
    /// > 0; 1 disables. Divides positive logits (multiplies negative ones) of seen tokens.
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    pub max_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    pub stop: Vec<String>,
    /// Keep generating past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Report this many top alternatives with each sampled token.
    pub logprobs: usize,
    /// Independent samples from one prompt (they share its KV blocks).
    pub n: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: 16,
            stop_token_ids: vec![],
            stop: vec![],
            ignore_eos: false,
            logprobs: 0,
            n: 1,
        }
    }
}

macro_rules! setter {
    ($name:ident: $ty:ty) => {
        pub fn $name(mut self, v: $ty) -> Self {
            self.$name = v;
            self
        }
    };
}

impl SamplingParams {
    /// Whether sampling needs the whole row of log-probabilities; if not, its token is the
    /// row's argmax and only that is reported (`vellum_kernels::pick`): greedy, without
    /// penalties or alternatives. Must agree with `sample`.
    pub fn needs_whole_row(&self) -> bool {
        self.temperature != 0.0 || self.penalised() || self.logprobs > 0
    }

    fn penalised(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }

    setter!(temperature: f32);
    setter!(top_k: i64);
    setter!(top_p: f32);
    setter!(min_p: f32);
    setter!(repetition_penalty: f32);
    setter!(presence_penalty: f32);
    setter!(frequency_penalty: f32);
    setter!(max_tokens: usize);
    setter!(stop_token_ids: Vec<u32>);
    setter!(stop: Vec<String>);
    setter!(ignore_eos: bool);
    setter!(logprobs: usize);
    setter!(n: usize);

    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Rejects impossible values, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |field: &'static str, msg: String| Err(EngineError::InvalidRequest { field, msg });
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(
                "temperature",
                format!("must be a finite number >= 0, got {}", self.temperature),
            );
        }
        if self.top_k < 0 {
            return bad(
                "top_k",
                format!("must be >= 0 (0 disables it), got {}", self.top_k),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                format!("must be > 0, got {}", self.repetition_penalty),
            );
        }
        for (field, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(field, format!("must be in [-2, 2], got {v}"));
            }
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be at least 1".into());
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop", "stop strings must not be empty".into());
        }
        if !(1..=128).contains(&self.n) {
            return bad("n", format!("must be between 1 and 128, got {}", self.n));
        }
        if self.logprobs > 20 {
            return bad(
                "logprobs",
                format!("at most 20 alternatives, got {}", self.logprobs),
            );
        }
        Ok(())
    }
}

/// A small, fast, seedable PRNG (SplitMix64): per-request streams, independent of batching.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks the next token from a row of log-probabilities. `prompt` and `output` are the
/// sequence so far, used by the penalties (repetition counts both; presence and frequency
/// count the output).
pub fn sample(
    logprobs: &[f32],
    params: &SamplingParams,
    prompt: &[u32],
    output: &[u32],
    rng: &mut Rng,
) -> u32 {
    let penalised = params.penalised();
    if !penalised && params.temperature == 0.0 {
        return argmax(logprobs); // greedy: no copy of the row
    }
    let mut logits: Vec<f32> = logprobs.to_vec();
    if penalised {
        let mut seen = std::collections::HashMap::<u32, u32>::new();
        for &t in output {
            *seen.entry(t).or_default() += 1;
        }
        let mut in_history = std::collections::HashSet::new();
        for &t in prompt.iter().chain(output) {
            if in_history.insert(t) && (t as usize) < logits.len() {
                // Log-probabilities are negative: "divide positive / multiply negative" on
                // logits becomes multiply here, since the shift does not change the order.
                let l = &mut logits[t as usize];
                *l = if *l > 0.0 {
                    *l / params.repetition_penalty
                } else {
                    *l * params.repetition_penalty
                };
            }
        }
        for (&t, &count) in &seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= params.presence_penalty + params.frequency_penalty * count as f32;
            }
        }
    }
    if params.temperature == 0.0 {
        return argmax(&logits);
    }
    let candidates = match params.top_k {
        0 => logits.len(),
        k => k as usize,
    };
    let idx = ranked(&logits, candidates);
    let max = logits[idx[0] as usize];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i as usize] - max) / params.temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    let mut keep = probs.len();
    if params.top_p < 1.0 {
        let mut cum = 0.0;
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
    }
    if params.min_p > 0.0 {
        let floor = probs[0] * params.min_p as f64;
        keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
    }
    let total: f64 = probs[..keep].iter().sum();
    let mut r = rng.next_f64() * total;
    for (i, p) in probs[..keep].iter().enumerate() {
        r -= p;
        if r < 0.0 {
            return idx[i];
        }
    }
    idx[keep - 1]
}

/// The `k` most likely tokens of a row, most likely first.
pub fn top_k(logprobs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let ids = ranked(logprobs, k);
    ids.into_iter().map(|i| (i, logprobs[i as usize])).collect()
}

/// The first `k` (or all) of the row's tokens in order of `f32::total_cmp`, largest first,
/// ties by id, so the order is fully determined. Sorts one 64-bit key per token (value rank,
/// then id), not ids compared through the row, and selects before sorting when `k` is less
/// than the row: it runs once per sampled token (`benches/cpu_ops.rs`, `sample/…`).
fn ranked(row: &[f32], k: usize) -> Vec<u32> {
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
/// ascending within a rank: a radix sort, three passes of 11 bits, 3-4x faster than a
/// comparison sort of a vocabulary.
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

/// `x`'s place in the order of `f32::total_cmp`, reversed: smaller ranks are larger values.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_parameters_name_their_field() {
        let cases = [
            (SamplingParams::default().temperature(-1.0), "temperature"),
            (
                SamplingParams::default().temperature(f32::NAN),
                "temperature",
            ),
            (SamplingParams::default().top_p(0.0), "top_p"),
            (SamplingParams::default().top_p(1.5), "top_p"),
            (SamplingParams::default().top_k(-1), "top_k"),
            (SamplingParams::default().max_tokens(0), "max_tokens"),
            (SamplingParams::default().min_p(2.0), "min_p"),
            (SamplingParams::default().n(0), "n"),
        ];
        for (p, field) in cases {
            match p.validate() {
                Err(EngineError::InvalidRequest { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        assert!(SamplingParams::default().top_k(0).validate().is_ok());
    }

    #[test]
    fn greedy_takes_the_argmax_and_seeded_sampling_repeats() {
        let row = [-3.0f32, -0.5, -1.0, -2.0];
        let mut rng = Rng::new(1);
        assert_eq!(
            sample(&row, &SamplingParams::default(), &[], &[], &mut rng),
            1
        );
        let p = SamplingParams::default().temperature(1.0);
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..32)
                .map(|_| sample(&row, &p, &[], &[], &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let top1 = SamplingParams::default().temperature(1.0).top_k(1);
        assert!((0..20).all(|_| sample(&row, &top1, &[], &[], &mut rng) == 1));
        let topp = SamplingParams::default().temperature(1.0).top_p(0.01);
        assert!((0..20).all(|_| sample(&row, &topp, &[], &[], &mut rng) == 1));
    }

    /// Sampled frequencies follow softmax(logits / T), including the first draw of fresh
    /// per-seed streams (what each request's first token uses).
    #[test]
    fn frequencies_follow_the_tempered_distribution() {
        let row = [-1.88f32, -1.96, -2.27, -3.5, -6.0];
        let t = 0.3f64;
        let w: Vec<f64> = row
            .iter()
            .map(|&l| ((l as f64 - row[0] as f64) / t).exp())
            .collect();
        let z: f64 = w.iter().sum();
        let p = SamplingParams::default().temperature(t as f32);
        let trials = 20_000;
        let mut fresh = [0usize; 5];
        let mut stream = [0usize; 5];
        let mut rng = Rng::new(12345);
        for seed in 0..trials {
            fresh[sample(&row, &p, &[], &[], &mut Rng::new(seed as u64)) as usize] += 1;
            stream[sample(&row, &p, &[], &[], &mut rng) as usize] += 1;
        }
        for i in 0..5 {
            let want = w[i] / z;
            for (name, counts) in [("fresh seeds", &fresh), ("one stream", &stream)] {
                let got = counts[i] as f64 / trials as f64;
                assert!(
                    (got - want).abs() < 0.015,
                    "{name}: token {i}: {got:.3} vs {want:.3}"
                );
            }
        }
    }

    /// The order the sampler ranked tokens in before `ranked`: ids sorted through the row.
    fn reference_order(row: &[f32]) -> Vec<u32> {
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        idx
    }

    /// Rows with ties, both zeros, infinities and NaNs of both signs.
    fn awkward_rows() -> Vec<Vec<f32>> {
        let mut rng = Rng::new(3);
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
                // short rows, and long ones that take the radix sort
                let n = if r % 8 == 7 {
                    1000 + r * 300
                } else {
                    1 + r * 7
                };
                (0..n)
                    .map(|_| match rng.next_u64() % 4 {
                        0 => specials[(rng.next_u64() % specials.len() as u64) as usize],
                        // few distinct values: many ties
                        1 => -((rng.next_u64() % 4) as f32),
                        _ => -(rng.next_f64() * 12.0) as f32,
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn ranking_follows_total_cmp_then_id() {
        for row in awkward_rows() {
            let want = reference_order(&row);
            assert_eq!(ranked(&row, row.len()), want, "{row:?}");
            for k in [1, 2, 5, row.len() + 3] {
                let k_want = &want[..k.min(row.len())];
                assert_eq!(ranked(&row, k), k_want, "k = {k}: {row:?}");
            }
        }
    }

    /// The sampler before `ranked`, to hold the new one to the same tokens bit for bit.
    fn reference_sample(logits: &[f32], params: &SamplingParams, rng: &mut Rng) -> u32 {
        let mut idx = reference_order(logits);
        if params.top_k > 0 {
            idx.truncate(params.top_k as usize);
        }
        let max = logits[idx[0] as usize];
        let t = params.temperature;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (((logits[i as usize] - max) / t) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        let mut keep = probs.len();
        if params.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        if params.min_p > 0.0 {
            let floor = probs[0] * params.min_p as f64;
            keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
        }
        let total: f64 = probs[..keep].iter().sum();
        let mut r = rng.next_f64() * total;
        for (i, p) in probs[..keep].iter().enumerate() {
            r -= p;
            if r < 0.0 {
                return idx[i];
            }
        }
        idx[keep - 1]
    }

    #[test]
    fn sampling_draws_what_the_sort_through_the_row_drew() {
        let mut draws = 0;
        let t = |x| SamplingParams::default().temperature(x);
        let params = [
            t(1.0),
            t(0.7).top_p(0.9),
            t(1.3).top_k(3),
            t(0.5).top_k(40).top_p(0.95).min_p(0.05),
            t(2.0).min_p(0.2),
        ];
        for row in awkward_rows() {
            // Finite rows, as the model gives (a NaN logit has no probability to draw with).
            let row: Vec<f32> = row
                .iter()
                .map(|&x| {
                    if x.is_nan() {
                        -30.0
                    } else {
                        x.clamp(-40.0, 0.0)
                    }
                })
                .collect();
            for p in &params {
                for seed in 0..8 {
                    let want = reference_sample(&row, p, &mut Rng::new(seed));
                    assert_eq!(
                        sample(&row, p, &[], &[], &mut Rng::new(seed)),
                        want,
                        "{p:?} {row:?}"
                    );
                    draws += 1;
                }
            }
        }
        assert_eq!(draws, 40 * 5 * 8);
    }

    #[test]
    fn top_k_is_sorted() {
        assert_eq!(
            top_k(&[-1.0, -0.1, -5.0, -0.2], 2),
            vec![(1, -0.1), (3, -0.2)]
        );
    }
}
