//! Sampling parameters, their validation, and the sampler that turns a row of
//! log-probabilities into a token.

use crate::error::{EngineError, Result};
pub use vellum_kernels::pick::argmax;
use vellum_kernels::pick::{ranked, top_pairs, Pick, MAX_RANKED};

/// What drawing a sequence's next token needs of its row of log-probabilities, where the
/// row is (on a GPU, what crosses the bus): [`SamplingParams::row_need`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowNeed {
    /// The whole row: penalties, or a draw from more tokens than a backend ranks.
    Whole,
    /// Its argmax and value (`vellum_kernels::pick`): greedy, without alternatives.
    Pick,
    /// Its pick and its `k` most likely tokens, ranked (`Backend::top_rows`): greedy with
    /// `logprobs` alternatives, or a draw within `top_k` (at most `MAX_RANKED`).
    Ranked(usize),
}

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
    /// What drawing a token needs of its row of log-probabilities. Must agree with `sample`
    /// and `sample_ranked`.
    pub fn row_need(&self) -> RowNeed {
        if self.penalised() {
            return RowNeed::Whole;
        }
        if self.temperature == 0.0 {
            return match self.logprobs {
                0 => RowNeed::Pick,
                k => RowNeed::Ranked(k),
            };
        }
        let k = (self.top_k.max(0) as usize).max(self.logprobs);
        match self.top_k > 0 && k <= MAX_RANKED {
            true => RowNeed::Ranked(k),
            false => RowNeed::Whole,
        }
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
    let values: Vec<f32> = idx.iter().map(|&i| logits[i as usize]).collect();
    idx[draw_ranked(&values, params, rng)]
}

/// What `sample` does once a row is ranked: draws from `values`, the row's values most
/// likely first (all of them, or its first `top_k`), and returns the drawn one's place.
fn draw_ranked(values: &[f32], params: &SamplingParams, rng: &mut Rng) -> usize {
    let max = values[0];
    let mut probs: Vec<f64> = values
        .iter()
        .map(|&l| (((l - max) / params.temperature) as f64).exp())
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
            return i;
        }
    }
    keep - 1
}

/// The token and log-probability `sample` gives a row that `row_need` says is
/// `RowNeed::Ranked`, from that row's ranked candidates ((index, value), most likely first,
/// as many as it asked for) and its pick: greedy rows take the argmax, sampled ones draw
/// within `top_k`, with the same stream and the same result as from the whole row.
pub fn sample_ranked(
    ranked: &[(u32, f32)],
    pick: Pick,
    params: &SamplingParams,
    rng: &mut Rng,
) -> (u32, f32) {
    if params.temperature == 0.0 {
        return (pick.argmax, pick.logprob);
    }
    let within = &ranked[..(params.top_k as usize).min(ranked.len())];
    let values: Vec<f32> = within.iter().map(|&(_, v)| v).collect();
    within[draw_ranked(&values, params, rng)]
}

/// The `k` most likely tokens of a row, most likely first.
pub fn top_k(logprobs: &[f32], k: usize) -> Vec<(u32, f32)> {
    top_pairs(logprobs, k)
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

    /// Where `row_need` says `Ranked(k)`, the row's `k` ranked candidates and its pick draw
    /// exactly what `sample` draws from the whole row: the same token, value, alternatives
    /// and stream. It says `Whole` where that could not hold.
    #[test]
    fn ranked_candidates_draw_what_the_whole_row_draws() {
        use vellum_kernels::pick::pick;
        let t = |x| SamplingParams::default().temperature(x);
        let greedy = SamplingParams::default();
        let cases = [
            (greedy.clone().logprobs(3), RowNeed::Ranked(3)),
            (t(0.9).top_k(5).logprobs(2), RowNeed::Ranked(5)),
            (t(0.9).top_k(2).logprobs(4), RowNeed::Ranked(4)),
            (t(0.7).top_k(40).top_p(0.9).min_p(0.05), RowNeed::Ranked(40)),
            (t(1.0).top_k(MAX_RANKED as i64), RowNeed::Ranked(MAX_RANKED)),
            (t(1.0).top_k(MAX_RANKED as i64 + 1), RowNeed::Whole),
            (t(1.0), RowNeed::Whole),
            (t(0.8).top_p(0.9), RowNeed::Whole),
            (greedy.clone().repetition_penalty(1.2), RowNeed::Whole),
            (t(1.0).top_k(5).presence_penalty(0.5), RowNeed::Whole),
            (greedy.clone(), RowNeed::Pick),
        ];
        let mut rng = Rng::new(5);
        for (params, need) in cases {
            assert_eq!(params.row_need(), need, "{params:?}");
            let RowNeed::Ranked(k) = need else { continue };
            for n in [3usize, 70, 2000] {
                let row: Vec<f32> = (0..n)
                    .map(|_| -((rng.next_u64() % 400) as f32) / 37.0)
                    .collect();
                let ranked = top_pairs(&row, k);
                for seed in 0..16 {
                    let (mut a, mut b) = (Rng::new(seed), Rng::new(seed));
                    let token = sample(&row, &params, &[], &[], &mut a);
                    let got = sample_ranked(&ranked, pick(&row, u32::MAX), &params, &mut b);
                    assert_eq!(got, (token, row[token as usize]), "{params:?} n {n}");
                    assert_eq!(a.next_u64(), b.next_u64(), "the stream moved alike");
                    let alternatives = &ranked[..params.logprobs.min(ranked.len())];
                    assert_eq!(alternatives, top_k(&row, params.logprobs));
                }
            }
        }
    }

    #[test]
    fn top_k_is_sorted() {
        assert_eq!(
            top_k(&[-1.0, -0.1, -5.0, -0.2], 2),
            vec![(1, -0.1), (3, -0.2)]
        );
    }
}
