//! The embeddable engine: continuous batching over the paged KV cache.
//!
//! Each [`Engine::step`] schedules running sequences first (a decode token, or the next
//! chunk of a prompt), then admits waiting requests in FCFS order, all within
//! `max_batched_tokens` and `max_seqs`. When the pool runs out of blocks the most recently
//! admitted sequence is preempted by recompute: its blocks are freed and it goes back to the
//! head of the queue with the tokens it already generated, so its output is unchanged.

use crate::error::{EngineError, Result};
use crate::graphs::{GraphStats, StepGraphs};
use crate::kv::BlockManager;
use crate::loader::Checkpoint;
use crate::model::{LogitRows, Model};
use crate::sampler::{sample, sample_ranked, top_k, Rng, RowNeed, SamplingParams};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};
use rayon::prelude::*;
use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::path::Path;
use vellum_kernels::{cpu::Cpu, Backend, BatchLayout, KvDtype, KvLayer, Pick, NO_TARGET};

pub type RequestId = u64;

/// One sequence of a request (a request with `n` samples has `n` of them).
type SeqId = u64;

/// Engine settings; `Default` suits a small model on a CPU.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Memory for the KV cache pool.
    pub kv_cache_bytes: usize,
    /// Element type of the KV cache (`KvDtype`: f16 holds twice the tokens in the same
    /// memory and halves what long-context decode reads).
    pub kv_dtype: KvDtype,
    /// Token budget of one step (prefill chunks plus decodes).
    pub max_batched_tokens: usize,
    /// Sequences in one step.
    pub max_seqs: usize,
    /// Reuse the KV blocks of earlier prompts with the same prefix.
    pub enable_prefix_caching: bool,
    /// Record decode steps and replay them as one launch (CUDA graphs) where the backend can:
    /// the same results, without a launch per op. Off by default until measured on GPUs.
    pub step_graphs: bool,
    /// Bring every row of log-probabilities back whole, and pick greedy tokens and scored
    /// prompt tokens from them on the host, as steps did before `Backend::pick_rows`: a
    /// benchmark's baseline (`vellum bench --picks-on-host`), the same results.
    pub picks_on_host: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            block_size: 16,
            kv_cache_bytes: 256 << 20,
            kv_dtype: KvDtype::default(),
            max_batched_tokens: 512,
            max_seqs: 64,
            enable_prefix_caching: true,
            step_graphs: false,
            picks_on_host: false,
        }
    }
}

/// What a request asks for.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Report the log-probability of every prompt token after the first.
    pub prompt_logprobs: bool,
    /// Only score the prompt: finish after prefill without generating.
    pub score_only: bool,
    /// Scheduling priority: lower runs first (FCFS within one priority); under memory
    /// pressure the highest value is preempted first.
    pub priority: i32,
}

impl Request {
    pub fn tokens(prompt: Vec<u32>, params: SamplingParams) -> Request {
        Request {
            prompt,
            params,
            prompt_logprobs: false,
            score_only: false,
            priority: 0,
        }
    }

    /// A scoring request: log-probabilities of `tokens[1..]` given their prefixes.
    pub fn score(tokens: Vec<u32>) -> Request {
        Request {
            prompt: tokens,
            params: SamplingParams::default().max_tokens(1),
            prompt_logprobs: true,
            score_only: true,
            priority: 0,
        }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token, stop token or stop string.
    Stop,
    /// `max_tokens` reached, or the model's context is full.
    Length,
    Aborted,
    /// A scoring request finished.
    Scored,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Aborted => "abort",
            FinishReason::Scored => "scored",
        }
    }
}

/// Per-request usage counts, for metering.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache instead of being computed.
    pub cached_tokens: usize,
    /// Tokens computed again after preemption.
    pub recomputed_tokens: usize,
}

/// One sampled token with its log-probability and the top alternatives asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What a step produced for one request.
#[derive(Debug, Clone)]
pub struct RequestOutput {
    pub request_id: RequestId,
    /// Which of the request's `n` samples this is (0 when n = 1).
    pub sample_index: usize,
    pub new_tokens: Vec<TokenLogprob>,
    /// Newly decoded text (UTF-8 safe; held back while a stop string might be forming).
    pub text_delta: String,
    pub finish_reason: Option<FinishReason>,
    /// Log-probabilities of prompt tokens 1.., once the prompt is fully processed.
    pub prompt_logprobs: Option<Vec<f32>>,
    /// For each prompt logprob: whether that token was the argmax.
    pub prompt_is_greedy: Option<Vec<bool>>,
    pub usage: Usage,
}

struct Sequence {
    request_id: RequestId,
    sample_index: usize,
    /// Seed of sample 0; sample i draws from its own stream derived from it.
    seed: u64,
    /// Whether the `n > 1` samples were split off already (once, after the prompt).
    forked: bool,
    req: Request,
    output: Vec<u32>,
    /// Tokens whose K/V are in the cache.
    num_computed: usize,
    blocks: Vec<u32>,
    /// Chained hashes of the full blocks registered in the prefix cache so far.
    block_hashes: Vec<u64>,
    rng: Rng,
    prompt_logprobs: Vec<f32>,
    /// Whether each prompt token was the most likely one (lm-evaluation-harness `is_greedy`).
    prompt_is_greedy: Vec<bool>,
    /// Decoded output text, and how many of its bytes were emitted already.
    decoder: IncrementalDecoder,
    emitted: usize,
    usage: Usage,
}

impl Sequence {
    /// Takes a token drawn for it (`draw`): its random stream moves past the draw.
    fn accept(&mut self, drawn: Drawn) -> TokenLogprob {
        self.rng = drawn.rng;
        drawn.token
    }

    fn len(&self) -> usize {
        self.req.prompt.len() + self.output.len()
    }

    fn token(&self, i: usize) -> u32 {
        let p = self.req.prompt.len();
        if i < p {
            self.req.prompt[i]
        } else {
            self.output[i - p]
        }
    }
}

/// The engine: a model, a backend, a KV pool and the scheduler state.
pub struct Engine {
    /// Recorded decode steps (`EngineConfig::step_graphs`). First, so that they are dropped
    /// before the weights and KV pools their launches read.
    graphs: Option<StepGraphs>,
    model: Model,
    tokenizer: Option<Tokenizer>,
    backend: Box<dyn Backend>,
    config: EngineConfig,
    kv: Vec<KvLayer>,
    blocks: BlockManager,
    seqs: HashMap<SeqId, Sequence>,
    waiting: VecDeque<SeqId>,
    /// Admission order: the last one is the first to be preempted.
    running: Vec<SeqId>,
    next_id: RequestId,
    next_seq: SeqId,
    /// Counts since start, for benches and logs.
    pub stats: EngineStats,
}

/// Engine-wide counters.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub steps: u64,
    pub preemptions: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    /// Wall time inside `step`, and the part of it spent in the model's forward pass; the
    /// rest is scheduling, block management, sampling and detokenization.
    pub step_ns: u64,
    pub forward_ns: u64,
}

impl EngineStats {
    /// Share of step time spent outside the forward pass.
    pub fn overhead_fraction(&self) -> f64 {
        if self.step_ns == 0 {
            return 0.0;
        }
        self.step_ns.saturating_sub(self.forward_ns) as f64 / self.step_ns as f64
    }
}

/// Builder for [`Engine`].
#[derive(Default)]
pub struct EngineBuilder {
    model_path: Option<std::path::PathBuf>,
    config: EngineConfig,
    backend: Option<Box<dyn Backend>>,
    dtype: Option<vellum_quant::DType>,
    quant: Option<vellum_kernels::QuantTarget>,
    device: Option<vellum_kernels::Device>,
}

impl EngineBuilder {
    pub fn model(mut self, path: impl AsRef<Path>) -> Self {
        self.model_path = Some(path.as_ref().to_path_buf());
        self
    }

    pub fn config(mut self, config: EngineConfig) -> Self {
        self.config = config;
        self
    }

    pub fn kv_cache_bytes(mut self, bytes: usize) -> Self {
        self.config.kv_cache_bytes = bytes;
        self
    }

    /// The KV cache's element type (`EngineConfig::kv_dtype`).
    pub fn kv_dtype(mut self, dtype: KvDtype) -> Self {
        self.config.kv_dtype = dtype;
        self
    }

    /// Converts all weights to this dense dtype after loading (applied before `quant`).
    pub fn dtype(mut self, dtype: vellum_quant::DType) -> Self {
        self.dtype = Some(dtype);
        self
    }

    /// Quantizes the linear layers on load (see `Model::quantize_linears`).
    pub fn quant(mut self, target: vellum_kernels::QuantTarget) -> Self {
        self.quant = Some(target);
        self
    }

    /// Runs on this device's backend (default: the CPU). Fails at `build` when the device is
    /// unusable, with the reason.
    pub fn device(mut self, device: vellum_kernels::Device) -> Self {
        self.device = Some(device);
        self
    }

    pub fn backend(mut self, backend: Box<dyn Backend>) -> Self {
        self.backend = Some(backend);
        self
    }

    pub fn build(self) -> Result<Engine> {
        let path = self.model_path.ok_or(EngineError::InvalidRequest {
            field: "model",
            msg: "no model path given to the builder".into(),
        })?;
        // The device first: an unusable one fails before a model is read.
        let backend = match (self.backend, self.device) {
            (Some(b), _) => b,
            (None, Some(d)) => d.backend()?,
            (None, None) => Box::new(Cpu::new()),
        };
        let mut ck = Checkpoint::open(&path)?;
        let mut model = ck.load_model()?;
        // The mapped file goes now, before the backend repacks the weights (`Engine::new`):
        // holding both would set the peak resident memory.
        let tokenizer = ck.tokenizer.take();
        drop(ck);
        if let Some(d) = self.dtype {
            model.to_dtype(d)?;
        }
        if let Some(q) = self.quant {
            model.quantize_linears(q)?;
        }

        let c = &model.config;
        tracing::info!(
            model = %path.display(),
            arch = ?c.arch,
            layers = c.num_layers,
            hidden = c.hidden_size,
            weights_mib = model.weight_bytes() >> 20,
            backend = backend.name(),
            "model loaded"
        );
        Engine::new(model, tokenizer, backend, self.config)
    }
}

impl Engine {
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// An engine running `model` on `backend`, which first brings the model's matrices into
    /// its layout (`Backend::prepare_weight`; the CPU's integer dots repack quantized ones).
    pub fn new(
        mut model: Model,
        tokenizer: Option<Tokenizer>,
        backend: Box<dyn Backend>,
        config: EngineConfig,
    ) -> Result<Engine> {
        let invalid = |field, msg: String| Err(EngineError::InvalidRequest { field, msg });
        if config.block_size == 0 {
            return invalid("block_size", "must be at least 1".into());
        }
        if config.max_batched_tokens == 0 || config.max_seqs == 0 {
            return invalid(
                "max_batched_tokens",
                "max_batched_tokens and max_seqs must be at least 1".into(),
            );
        }
        let block_bytes = model.kv_bytes_per_token(config.kv_dtype) * config.block_size;
        let num_blocks = config.kv_cache_bytes / block_bytes;
        if num_blocks == 0 {
            return invalid(
                "kv_cache_bytes",
                format!(
                    "{} bytes hold no block of {} tokens ({block_bytes} bytes)",
                    config.kv_cache_bytes, config.block_size
                ),
            );
        }
        model.prepare_for(backend.as_ref())?;
        let kv = model.new_kv_cache(num_blocks, config.block_size, config.kv_dtype);
        tracing::info!(
            blocks = num_blocks,
            dtype = config.kv_dtype.name(),
            block_size = config.block_size,
            tokens = num_blocks * config.block_size,
            mib = (num_blocks * block_bytes) >> 20,
            "KV cache allocated"
        );
        Ok(Engine {
            graphs: config.step_graphs.then(StepGraphs::default),
            blocks: BlockManager::new(num_blocks, config.block_size),
            model,
            tokenizer,
            backend,
            config,
            kv,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            next_seq: 0,
            stats: EngineStats::default(),
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// What the recorded decode steps did, when `EngineConfig::step_graphs` is on.
    pub fn graph_stats(&self) -> Option<&GraphStats> {
        self.graphs.as_ref().map(|g| &g.stats)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Tokens the whole KV pool holds.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.blocks.num_blocks() * self.config.block_size
    }

    /// Fraction of KV blocks in use.
    pub fn kv_usage(&self) -> f64 {
        1.0 - self.blocks.num_free() as f64 / self.blocks.num_blocks() as f64
    }

    /// Tokenizes `text` (adding BOS when the model wants it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| EngineError::Tokenizer("the model has no tokenizer".into()))?
            .encode(text, true)
    }

    /// Validates and queues a request.
    pub fn add_request(&mut self, req: Request) -> Result<RequestId> {
        req.params.validate()?;
        let vocab = self.model.config.vocab_size;
        if req.prompt.is_empty() {
            return Err(EngineError::InvalidRequest {
                field: "prompt",
                msg: "is empty".into(),
            });
        }
        if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::InvalidRequest {
                field: "prompt",
                msg: format!("token id {t} is outside the vocabulary of {vocab}"),
            });
        }
        // A generating request needs room for its prompt and one new token; max_tokens
        // beyond the pool is capped at run time (finish reason "length").
        let needed = req.prompt.len() + usize::from(!req.score_only);
        let capacity = self.kv_capacity_tokens();
        if needed > capacity {
            return Err(EngineError::InvalidRequest {
                field: "prompt",
                msg: format!(
                    "{} tokens (plus generation) can never fit the KV cache of {capacity} tokens; raise kv_cache_bytes",
                    req.prompt.len()
                ),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let seed = req
            .params
            .seed
            .unwrap_or(id.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0xA5A5);
        let sid = self.next_seq;
        self.next_seq += 1;
        self.seqs.insert(
            sid,
            Sequence {
                request_id: id,
                sample_index: 0,
                seed,
                forked: false,
                usage: Usage {
                    prompt_tokens: req.prompt.len(),
                    ..Usage::default()
                },
                req,
                output: vec![],
                num_computed: 0,
                blocks: vec![],
                block_hashes: vec![],
                rng: Rng::new(seed),
                prompt_logprobs: vec![],
                prompt_is_greedy: vec![],
                decoder: IncrementalDecoder::default(),
                emitted: 0,
            },
        );
        self.enqueue(sid, false);
        Ok(id)
    }

    /// Aborts a request; its blocks are freed at once. Unknown ids are ignored (it may
    /// have finished already). Returns whether the request was live.
    pub fn abort(&mut self, id: RequestId) -> bool {
        let sids: Vec<SeqId> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.request_id == id)
            .map(|(&sid, _)| sid)
            .collect();
        for sid in &sids {
            self.finish_seq(*sid);
        }
        !sids.is_empty()
    }

    /// Drops a sequence and frees its blocks at once.
    fn finish_seq(&mut self, sid: SeqId) {
        if let Some(mut seq) = self.seqs.remove(&sid) {
            self.blocks.release(&mut seq.blocks);
        }
        self.waiting.retain(|&w| w != sid);
        self.running.retain(|&r| r != sid);
    }

    /// Whether any sample of request `id` is still running or waiting.
    pub fn is_unfinished(&self, id: RequestId) -> bool {
        self.seqs.values().any(|s| s.request_id == id)
    }

    /// KV blocks held by sequences (shared blocks counted once); excludes the prefix cache.
    pub fn kv_blocks_in_use(&self) -> usize {
        self.blocks.num_blocks() - self.blocks.num_free()
    }

    pub fn has_unfinished(&self) -> bool {
        !self.seqs.is_empty()
    }

    /// Tokens of KV cache the running sequences hold (what a decode step's attention reads).
    pub fn running_context_tokens(&self) -> usize {
        self.running
            .iter()
            .map(|id| self.seqs[id].num_computed)
            .sum()
    }

    /// Requests with at least one sample still running or waiting.
    pub fn num_unfinished(&self) -> usize {
        let ids: std::collections::HashSet<RequestId> =
            self.seqs.values().map(|s| s.request_id).collect();
        ids.len()
    }

    /// Checks the block invariant (each block free or owned, ref counts = owners).
    pub fn check_blocks(&self) -> std::result::Result<(), String> {
        self.blocks.check(self.seqs.values().map(|s| &s.blocks))
    }

    /// Puts a sequence in the waiting queue: after every sequence of the same or a better
    /// (lower) priority, or — for a preempted one, `front` — before those of its own.
    fn enqueue(&mut self, sid: SeqId, front: bool) {
        let prio = self.seqs[&sid].req.priority;
        let pos = self
            .waiting
            .iter()
            .position(|w| {
                let p = self.seqs[w].req.priority;
                if front {
                    p >= prio
                } else {
                    p > prio
                }
            })
            .unwrap_or(self.waiting.len());
        self.waiting.insert(pos, sid);
    }

    /// Preempts (by recompute) the running sequence of the worst priority, the most
    /// recently admitted among equals.
    /// Returns the victim and where it was in `running`.
    fn preempt_one(&mut self) -> Option<(SeqId, usize)> {
        let idx = (0..self.running.len())
            .max_by_key(|&i| (self.seqs[&self.running[i]].req.priority, i))?;
        let id = self.running.remove(idx);
        let seq = self.seqs.get_mut(&id).expect("running ids are live");
        self.blocks.release(&mut seq.blocks);
        seq.block_hashes.clear();
        seq.usage.recomputed_tokens += seq.num_computed;
        seq.num_computed = 0;
        tracing::debug!(
            seq = id,
            computed = seq.usage.recomputed_tokens,
            "preempted by recompute"
        );
        self.enqueue(id, true);
        self.stats.preemptions += 1;
        Some((id, idx))
    }

    /// Picks (sequence, chunk length) pairs for this step and gives them KV blocks.
    fn schedule(&mut self) -> Result<Vec<(SeqId, usize)>> {
        let mut budget = self.config.max_batched_tokens;
        let mut batch = Vec::new();
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let seq = self.seqs.get_mut(&id).expect("running ids are live");
            let chunk = (seq.len() - seq.num_computed).min(budget);
            let ok = own_tail_block(&mut self.blocks, &mut self.kv, seq)?
                && self.blocks.grow(&mut seq.blocks, seq.num_computed + chunk);
            if ok {
                batch.push((id, chunk));
                budget -= chunk;
                i += 1;
            } else {
                // Out of blocks: a victim goes back to the queue (maybe this one).
                let Some((victim, at)) = self.preempt_one() else {
                    break;
                };
                if let Some(k) = batch.iter().position(|&(b, _)| b == victim) {
                    budget += batch.remove(k).1;
                }
                if victim == id {
                    // This sequence went back to the queue (it was the one to give way, e.g.
                    // by priority); the rest of the running list still gets its turn.
                    continue;
                }
                if at < i {
                    i -= 1;
                }
            }
        }
        while budget > 0 && self.running.len() < self.config.max_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let seq = self.seqs.get_mut(&id).expect("waiting ids are live");
            // Scoring needs logits at every prompt position, so it computes them all.
            let cached = if self.config.enable_prefix_caching && !seq.req.prompt_logprobs {
                reuse_cached_prefix(&mut self.blocks, seq)
            } else {
                0
            };
            let chunk = (seq.len() - seq.num_computed).min(budget);
            if !self.blocks.grow(&mut seq.blocks, seq.num_computed + chunk) {
                // Give the reused blocks back (they stay cached) and wait for room.
                self.blocks.release(&mut seq.blocks);
                seq.block_hashes.clear();
                seq.num_computed = 0;
                break;
            }
            seq.usage.cached_tokens += cached;
            self.waiting.pop_front();
            self.running.push(id);
            batch.push((id, chunk));
            budget -= chunk;
        }
        Ok(batch)
    }

    /// Runs one step of continuous batching and returns what each touched request produced.
    pub fn step(&mut self) -> Result<Vec<RequestOutput>> {
        let started = std::time::Instant::now();
        let outputs = self.step_inner();
        self.stats.step_ns += started.elapsed().as_nanos() as u64;
        outputs
    }

    fn step_inner(&mut self) -> Result<Vec<RequestOutput>> {
        let batch = self.schedule()?;
        if batch.is_empty() {
            if let Some(&id) = self.waiting.front() {
                // Nothing runs and the head cannot be admitted: cannot happen for requests
                // that passed admission, but never spin forever on it.
                return Err(EngineError::InvalidRequest {
                    field: "prompt",
                    msg: format!("request {id} does not fit the KV cache"),
                });
            }
            return Ok(vec![]);
        }
        self.stats.steps += 1;
        let bs = self.config.block_size;
        let mut layout = BatchLayout {
            seq_offsets: vec![0],
            ..BatchLayout::default()
        };
        let mut tokens = Vec::new();
        // A prompt row scored and the next-token row of a greedy or scoring sequence need
        // only a pick; a sampled one its whole row, or its top candidates
        // (`SamplingParams::row_need`).
        let vocab = self.model.config.vocab_size;
        let mut rows = LogitRows {
            picks_on_host: self.config.picks_on_host,
            ..LogitRows::default()
        };
        // Per scheduled sequence: what `advance` needs to find its rows in the step's output.
        let mut plan = Vec::with_capacity(batch.len());
        for &(id, chunk) in &batch {
            let seq = &self.seqs[&id];
            let (start, end) = (seq.num_computed, seq.num_computed + chunk);
            let prompt_len = seq.req.prompt.len();
            let first_pick = rows.picked.len();
            let mut next = None;
            for p in start..end {
                tokens.push(seq.token(p));
                layout.positions.push(p as u32);
                let blk = seq.blocks[p / bs] as usize;
                layout.slot_mapping.push((blk * bs + p % bs) as u32);
                let row = tokens.len() - 1;
                // A prompt row predicts prompt token p+1; the last row predicts the next token.
                if seq.req.prompt_logprobs && p + 1 < prompt_len {
                    rows.picked.push((row, seq.req.prompt[p + 1]));
                } else if p + 1 == seq.len() {
                    let need = match seq.req.score_only {
                        true => RowNeed::Pick,
                        false => seq.req.params.row_need(),
                    };
                    next = Some(rows.plan_next(row, need, vocab));
                }
            }
            let prompt_picks = first_pick..rows.picked.len() - next.map_or(0, NextRowAt::picks);
            layout.seq_offsets.push(tokens.len());
            layout.block_tables.push(seq.blocks.clone());
            layout.context_lens.push(end);
            plan.push(Planned {
                id,
                start,
                end,
                prompt_picks,
                next,
            });
        }
        self.stats.prompt_tokens += tokens.len() as u64;
        // The whole forward pass runs on a pool thread: the ops' parallel loops then start
        // from inside the pool instead of each waking it from outside (hundreds a step).
        let (model, backend, kv) = (&self.model, self.backend.as_ref(), &mut self.kv);
        let graphs = self.graphs.as_mut();
        let forward_start = std::time::Instant::now();
        let out = rayon::scope(|_| {
            model.forward_with_graphs(backend, &tokens, &layout, kv, &rows, graphs)
        })?;
        self.stats.forward_ns += forward_start.elapsed().as_nanos() as u64;
        let whole_row = |r: usize| &out.whole[r * vocab..(r + 1) * vocab];
        // Draws from whole rows on the pool's threads, a sequence each: a draw over a whole
        // vocabulary takes most of a millisecond (`sampler::sample`), and a step may hold
        // hundreds. Samples about to split off (`n > 1`) draw in `emit`, from their own rows.
        let mut drawn: Vec<Option<Drawn>> = plan
            .par_iter()
            .map(|planned| {
                let Some(NextRowAt::Whole(r)) = planned.next else {
                    return None;
                };
                let seq = &self.seqs[&planned.id];
                let forks = !seq.forked && seq.req.params.n > 1;
                (!forks && !seq.req.score_only).then(|| draw(whole_row(r), seq))
            })
            .collect();
        let mut outputs = Vec::with_capacity(plan.len());
        for (planned, drawn) in plan.into_iter().zip(&mut drawn) {
            let next = planned.next.map(|at| match (at, drawn.take()) {
                (NextRowAt::Whole(_), Some(d)) => Next::Drawn(d),
                (NextRowAt::Whole(r), None) => Next::Whole(whole_row(r)),
                (NextRowAt::Picked(i), _) => Next::Picked(out.picks[i]),
                (NextRowAt::Ranked { pick, ranked }, _) => {
                    Next::Ranked(out.picks[pick], &out.ranked[ranked])
                }
            });
            let prompt_picks = &out.picks[planned.prompt_picks.clone()];
            outputs.extend(self.advance(&planned, prompt_picks, next));
        }
        Ok(outputs)
    }

    /// Applies one step's results to a sequence: prompt logprobs (from the picks of its
    /// scored prompt rows), a sampled token (from `next`, its next-token row), stops.
    /// When the prompt of an `n > 1` request completes, its other samples split off here,
    /// sharing the prompt's blocks, and each draws its first token from the same row.
    fn advance(
        &mut self,
        planned: &Planned,
        prompt_picks: &[Pick],
        next: Option<Next>,
    ) -> Vec<RequestOutput> {
        let (sid, start, end) = (planned.id, planned.start, planned.end);
        let seq = self.seqs.get_mut(&sid).expect("scheduled ids are live");
        seq.num_computed = end;
        if self.config.enable_prefix_caching {
            register_full_blocks(&mut self.blocks, seq);
        }
        let prompt_len = seq.req.prompt.len();
        let scored = (start..end).filter(|&p| seq.req.prompt_logprobs && p + 1 < prompt_len);
        for (p, pick) in scored.zip(prompt_picks) {
            // Recomputed rows after preemption are identical; record each once.
            if p + 1 > seq.prompt_logprobs.len() {
                seq.prompt_logprobs.push(pick.logprob);
                seq.prompt_is_greedy
                    .push(pick.argmax == seq.req.prompt[p + 1]);
            }
        }
        let Some(next) = next else {
            return vec![]; // mid-prompt chunk: nothing to report yet
        };
        let mut sids = vec![sid];
        if !seq.forked && seq.req.params.n > 1 && !seq.req.score_only {
            seq.forked = true;
            sids.extend(self.fork_samples(sid));
        }
        sids.into_iter()
            .map(|s| self.emit(s, next.clone()))
            .collect()
    }

    /// Splits samples 1..n off sample 0 of a request whose prompt just completed.
    fn fork_samples(&mut self, sid: SeqId) -> Vec<SeqId> {
        let parent = &self.seqs[&sid];
        let children: Vec<Sequence> = (1..parent.req.params.n)
            .map(|i| Sequence {
                request_id: parent.request_id,
                sample_index: i,
                seed: parent.seed,
                forked: true,
                req: parent.req.clone(),
                output: parent.output.clone(),
                num_computed: parent.num_computed,
                blocks: parent.blocks.clone(),
                block_hashes: parent.block_hashes.clone(),
                rng: Rng::new(parent.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                prompt_logprobs: parent.prompt_logprobs.clone(),
                prompt_is_greedy: parent.prompt_is_greedy.clone(),
                decoder: IncrementalDecoder::default(),
                emitted: 0,
                usage: parent.usage,
            })
            .collect();
        let mut ids = Vec::with_capacity(children.len());
        for child in children {
            self.blocks.share(&child.blocks);
            let cid = self.next_seq;
            self.next_seq += 1;
            self.seqs.insert(cid, child);
            self.running.push(cid);
            ids.push(cid);
        }
        ids
    }

    /// Samples a sequence's next token from its row (or ends a scoring request) and decides
    /// whether it is finished.
    fn emit(&mut self, sid: SeqId, next: Next) -> RequestOutput {
        let eos = &self.model.config.eos_token_ids;
        let seq = self.seqs.get_mut(&sid).expect("emitting ids are live");
        let mut out = RequestOutput {
            request_id: seq.request_id,
            sample_index: seq.sample_index,
            new_tokens: vec![],
            text_delta: String::new(),
            finish_reason: None,
            prompt_logprobs: None,
            prompt_is_greedy: None,
            usage: seq.usage,
        };
        if seq.output.is_empty() && seq.req.prompt_logprobs {
            out.prompt_logprobs = Some(seq.prompt_logprobs.clone());
            out.prompt_is_greedy = Some(seq.prompt_is_greedy.clone());
        }
        if seq.req.score_only {
            out.finish_reason = Some(FinishReason::Scored);
        } else {
            let new = match next {
                Next::Whole(dist) => {
                    let drawn = draw(dist, seq);
                    seq.accept(drawn)
                }
                Next::Drawn(drawn) => seq.accept(drawn),
                Next::Ranked(pick, ranked) => {
                    let params = &seq.req.params;
                    let (token, logprob) = sample_ranked(ranked, pick, params, &mut seq.rng);
                    let alternatives = params.logprobs.min(ranked.len());
                    TokenLogprob {
                        token,
                        logprob,
                        top: ranked[..alternatives].to_vec(),
                    }
                }
                // The greedy token: what `sample` takes from a whole row.
                Next::Picked(pick) => TokenLogprob {
                    token: pick.argmax,
                    logprob: pick.logprob,
                    top: vec![],
                },
            };
            let token = new.token;
            seq.output.push(token);
            seq.usage.completion_tokens += 1;
            self.stats.generated_tokens += 1;
            out.new_tokens.push(new);
            let p = &seq.req.params;
            if (!p.ignore_eos && eos.contains(&token)) || p.stop_token_ids.contains(&token) {
                out.finish_reason = Some(FinishReason::Stop);
            } else if seq.output.len() >= p.max_tokens
                || seq.len() >= self.model.config.max_position_embeddings
                || seq.len() + 1 > self.blocks.num_blocks() * self.config.block_size
            {
                // Out of tokens to give: max_tokens, the model's context or the whole pool.
                out.finish_reason = Some(FinishReason::Length);
            }
            if let Some(tok) = &self.tokenizer {
                let (delta, stopped) = text_delta(tok, seq, out.finish_reason.is_some());
                out.text_delta = delta;
                if stopped {
                    out.finish_reason = Some(FinishReason::Stop);
                }
            }
            out.usage = seq.usage;
        }
        if out.finish_reason.is_some() {
            self.finish_seq(sid);
        }
        out
    }

    /// Runs requests to completion (offline use); outputs in request order. Samples 1..n
    /// of an `n > 1` request are in [`Completion::more_samples`].
    pub fn generate(&mut self, requests: Vec<Request>) -> Result<Vec<Completion>> {
        let ids = requests
            .into_iter()
            .map(|r| self.add_request(r))
            .collect::<Result<Vec<_>>>()?;
        let mut done: HashMap<RequestId, Completion> =
            ids.iter().map(|&id| (id, Completion::default())).collect();
        while ids.iter().any(|&id| self.is_unfinished(id)) {
            for out in self.step()? {
                if let Some(c) = done.get_mut(&out.request_id) {
                    c.absorb_sample(out);
                }
            }
        }
        Ok(ids
            .iter()
            .map(|id| done.remove(id).unwrap_or_default())
            .collect())
    }

    /// Log-probabilities of `tokens[1..]` for each token list (offline scoring).
    pub fn score(&mut self, token_lists: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>> {
        let done = self.generate(token_lists.into_iter().map(Request::score).collect())?;
        Ok(done
            .into_iter()
            .map(|c| c.prompt_logprobs.unwrap_or_default())
            .collect())
    }
}

/// Copy-on-write: before a sequence writes into its last, partly filled block, makes sure
/// the block is its own (forked samples share the prompt's). False when no block is free;
/// an error if a device copy of the pools cannot be brought back for the copy.
fn own_tail_block(
    blocks: &mut BlockManager,
    kv: &mut [KvLayer],
    seq: &mut Sequence,
) -> Result<bool> {
    let idx = seq.num_computed / blocks.block_size();
    if idx >= seq.blocks.len() || blocks.ref_count(seq.blocks[idx]) <= 1 {
        return Ok(true);
    }
    match blocks.fork_block(&mut seq.blocks, idx) {
        Some((old, new)) => {
            for layer in kv.iter_mut() {
                layer.copy_block(old as usize, new as usize)?;
            }
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Chained hashes of the first `n_blocks` full blocks of a sequence's tokens.
fn chained_hashes(
    seq: &Sequence,
    from: usize,
    parent: u64,
    n_blocks: usize,
    bs: usize,
) -> Vec<u64> {
    let mut hashes = Vec::with_capacity(n_blocks.saturating_sub(from));
    let mut parent = parent;
    for i in from..n_blocks {
        let tokens: Vec<u32> = (i * bs..(i + 1) * bs).map(|p| seq.token(p)).collect();
        parent = crate::kv::block_hash(parent, &tokens);
        hashes.push(parent);
    }
    hashes
}

/// Starts a sequence on the longest cached prefix of its tokens; returns the tokens reused.
/// At least one token is always left to compute: its logits are what the step needs.
fn reuse_cached_prefix(blocks: &mut BlockManager, seq: &mut Sequence) -> usize {
    let bs = blocks.block_size();
    let hashes = chained_hashes(seq, 0, 0, (seq.len() - 1) / bs, bs);
    let table = blocks.reuse_prefix(&hashes);
    let n = table.len();
    seq.blocks = table;
    seq.block_hashes = hashes[..n].to_vec();
    seq.num_computed = n * bs;
    n * bs
}

/// Registers the sequence's newly completed full blocks in the prefix cache.
fn register_full_blocks(blocks: &mut BlockManager, seq: &mut Sequence) {
    let bs = blocks.block_size();
    let done = seq.block_hashes.len();
    let full = seq.num_computed / bs;
    if full <= done {
        return;
    }
    let parent = seq.block_hashes.last().copied().unwrap_or(0);
    for (i, h) in chained_hashes(seq, done, parent, full, bs)
        .into_iter()
        .enumerate()
    {
        blocks.register(seq.blocks[done + i], h);
        seq.block_hashes.push(h);
    }
}

/// A finished request, collected from its outputs.
#[derive(Debug, Clone, Default)]
pub struct Completion {
    pub tokens: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub text: String,
    pub finish_reason: Option<FinishReason>,
    pub prompt_logprobs: Option<Vec<f32>>,
    pub prompt_is_greedy: Option<Vec<bool>>,
    pub usage: Usage,
    /// Samples 1..n of a request with `n > 1`.
    pub more_samples: Vec<Completion>,
}

impl Completion {
    /// Adds an output to this completion or, for samples 1.., to `more_samples`.
    pub fn absorb_sample(&mut self, out: RequestOutput) {
        match out.sample_index {
            0 => self.absorb(out),
            i => {
                if self.more_samples.len() < i {
                    self.more_samples.resize(i, Completion::default());
                }
                self.more_samples[i - 1].absorb(out);
            }
        }
    }

    pub fn absorb(&mut self, out: RequestOutput) {
        for t in &out.new_tokens {
            self.tokens.push(t.token);
        }
        self.logprobs.extend(out.new_tokens);
        self.text.push_str(&out.text_delta);
        if out.prompt_logprobs.is_some() {
            self.prompt_logprobs = out.prompt_logprobs;
            self.prompt_is_greedy = out.prompt_is_greedy;
        }
        self.finish_reason = out.finish_reason.or(self.finish_reason);
        self.usage = out.usage;
    }
}

/// Decodes the output so far and returns the text not yet emitted, holding back an
/// incomplete UTF-8 character and any tail that could still grow into a stop string.
/// Returns whether a stop string was found (the text is cut before it).
fn text_delta(tok: &Tokenizer, seq: &mut Sequence, finishing: bool) -> (String, bool) {
    if seq.decoder.update(tok, &seq.output, finishing).is_err() {
        return (String::new(), false);
    }
    let text = &seq.decoder.text;
    let stop_at = seq
        .req
        .params
        .stop
        .iter()
        .filter_map(|s| text.find(s.as_str()))
        .min();
    let (limit, stopped) = match stop_at {
        Some(i) => (i, true),
        None if finishing => (text.len(), false),
        None => {
            // Whole characters only (the decoder holds back partial ones).
            let mut safe = text.len();
            for s in &seq.req.params.stop {
                for k in (1..s.len()).rev() {
                    if s.is_char_boundary(k) && text[..safe].ends_with(&s[..k]) {
                        safe -= k;
                        break;
                    }
                }
            }
            (safe, false)
        }
    };
    let limit = limit.max(seq.emitted);
    let delta = text.get(seq.emitted..limit).unwrap_or("").to_string();
    seq.emitted = limit;
    (delta, stopped)
}

/// A scheduled sequence's part of a step: where its rows are in the step's output.
struct Planned {
    id: SeqId,
    start: usize,
    end: usize,
    /// The picks of its scored prompt rows.
    prompt_picks: Range<usize>,
    /// Its next-token row, when the step reaches its end.
    next: Option<NextRowAt>,
}

/// Where a sequence's next-token row is in a step's output.
#[derive(Clone, Copy)]
enum NextRowAt {
    Whole(usize),
    Picked(usize),
    /// Its pick, and its candidates in `StepOutput::ranked`.
    Ranked {
        pick: usize,
        ranked: usize,
    },
}

impl NextRowAt {
    /// Picks it takes.
    fn picks(self) -> usize {
        !matches!(self, NextRowAt::Whole(_)) as usize
    }
}

impl LogitRows {
    /// Asks for token row `row` what a next-token row needs (`need`, over a vocabulary of
    /// `vocab`): where it will be in the step's output.
    fn plan_next(&mut self, row: usize, need: RowNeed, vocab: usize) -> NextRowAt {
        if need == RowNeed::Whole {
            self.whole.push(row);
            return NextRowAt::Whole(self.whole.len() - 1);
        }
        let pick = self.picked.len();
        self.picked.push((row, NO_TARGET));
        let RowNeed::Ranked(k) = need else {
            return NextRowAt::Picked(pick);
        };
        self.top = self.top.max(k.min(vocab));
        self.ranked.push(pick);
        NextRowAt::Ranked {
            pick,
            ranked: self.ranked.len() - 1,
        }
    }
}

/// A sequence's next-token row: whole, or its token drawn from it already, or picked, or
/// picked with its top candidates (`SamplingParams::row_need`).
#[derive(Clone)]
enum Next<'a> {
    Whole(&'a [f32]),
    Drawn(Drawn),
    Picked(Pick),
    Ranked(Pick, &'a [(u32, f32)]),
}

/// A token drawn from a sequence's whole row, and the sequence's random stream after it.
#[derive(Clone)]
struct Drawn {
    token: TokenLogprob,
    rng: Rng,
}

/// Draws `seq`'s next token from its whole row, leaving `seq` as it is (`Sequence::accept`
/// takes the draw): draws of different sequences can run at once.
fn draw(dist: &[f32], seq: &Sequence) -> Drawn {
    let params = &seq.req.params;
    let mut rng = seq.rng.clone();
    let token = sample(dist, params, &seq.req.prompt, &seq.output, &mut rng);
    Drawn {
        token: TokenLogprob {
            token,
            logprob: dist[token as usize],
            top: top_k(dist, params.logprobs),
        },
        rng,
    }
}
