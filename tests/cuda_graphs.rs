//! Recorded decode steps (CUDA graphs) on the CUDA backend: a replay gives the bits the same
//! step gives op by op, writes the same KV cache, and costs one graph launch, no allocation,
//! and the copies of the inputs that changed. Under the CPU emulator always; on GPU 0 too
//! when it is usable (`scripts/gpu-check.sh` runs this on a GPU).

mod common;
use common::*;
use std::sync::Arc;
use vellum::engine::graphs::{GraphStats, StepGraphs};
use vellum::engine::model::{LogitRows, StepOutput};
use vellum::engine::{Checkpoint, Model};
use vellum::kernels::cuda::caching::{Caching, DEFAULT_CACHE_BYTES};
use vellum::kernels::cuda::counting::Counting;
use vellum::kernels::cuda::emu::EmuRuntime;
use vellum::kernels::cuda::{driver, CudaBackend, KernelRuntime};
use vellum::kernels::pick::pick;
use vellum::kernels::{BatchLayout, KvDtype, KvLayer, Pick, NO_TARGET};

const BLOCK: usize = 4;
/// Blocks of each sequence's own range of the pool.
const BLOCKS_PER_SEQ: usize = 64;
/// Keys per attention split: small, so that a short test crosses a split boundary.
const SPLIT_KEYS: u32 = 128;

fn backend(rt: Arc<Counting>) -> CudaBackend {
    let mut cuda = CudaBackend::new(Arc::new(Caching::new(rt, DEFAULT_CACHE_BYTES)));
    cuda.set_split_keys(SPLIT_KEYS);
    cuda
}

/// The layout of one new token per sequence, sequence `s` (of `(s, len)`) holding `len`
/// tokens before it, in blocks `s * BLOCKS_PER_SEQ ..`.
fn decode_layout(seqs: &[(usize, usize)]) -> BatchLayout {
    let table = |s: usize, len: usize| -> Vec<u32> {
        let first = (s * BLOCKS_PER_SEQ) as u32;
        (first..first + (len / BLOCK + 1) as u32).collect()
    };
    BatchLayout {
        positions: seqs.iter().map(|&(_, n)| n as u32).collect(),
        slot_mapping: seqs
            .iter()
            .map(|&(s, n)| ((s * BLOCKS_PER_SEQ + n / BLOCK) * BLOCK + n % BLOCK) as u32)
            .collect(),
        seq_offsets: (0..=seqs.len()).collect(),
        block_tables: seqs.iter().map(|&(s, n)| table(s, n)).collect(),
        context_lens: seqs.iter().map(|&(_, n)| n + 1).collect(),
    }
}

/// A model, its backend and its KV cache, decoding a few sequences.
struct Decoder {
    model: Model,
    be: CudaBackend,
    kv: Vec<KvLayer>,
    /// Tokens each sequence holds.
    lens: Vec<usize>,
}

impl Decoder {
    /// The tiny GQA model on an emulated CUDA backend counted by `rt`, its sequences'
    /// prompts (`prompts[s]` tokens) prefilled one by one.
    fn new(rt: Arc<Counting>, prompts: &[usize]) -> Decoder {
        let mut model = Checkpoint::open(&repo().join("tests/golden/models/llama_gqa"))
            .unwrap()
            .load_model()
            .unwrap();
        let be = backend(rt);
        model.prepare_for(&be).unwrap();
        let kv = model.new_kv_cache(prompts.len() * BLOCKS_PER_SEQ, BLOCK, KvDtype::F16);
        let mut d = Decoder {
            model,
            be,
            kv,
            lens: prompts.to_vec(),
        };
        for (s, &len) in prompts.iter().enumerate() {
            d.prefill(s, len);
        }
        d
    }

    /// Sequence `s`'s prompt of `len` tokens, alone.
    fn prefill(&mut self, s: usize, len: usize) {
        let first = (s * BLOCKS_PER_SEQ) as u32;
        let batch = BatchLayout {
            positions: (0..len as u32).collect(),
            slot_mapping: (0..len)
                .map(|p| ((first as usize + p / BLOCK) * BLOCK + p % BLOCK) as u32)
                .collect(),
            seq_offsets: vec![0, len],
            block_tables: vec![(first..first + len.div_ceil(BLOCK) as u32).collect()],
            context_lens: vec![len],
        };
        let tokens: Vec<u32> = (0..len as u32)
            .map(|p| (p * 7 + s as u32) % 200 + 1)
            .collect();
        let (m, kv) = (&self.model, &mut self.kv);
        m.forward(&self.be, &tokens, &batch, kv, &[len - 1])
            .unwrap();
    }

    /// A decode step of every sequence (through `graphs` if given): their
    /// log-probabilities.
    fn step(&mut self, graphs: Option<&mut StepGraphs>) -> Vec<f32> {
        let all: Vec<usize> = (0..self.lens.len()).collect();
        self.step_of(&all, graphs)
    }

    /// A decode step of sequences `seqs`, in that order: their rows of log-probabilities.
    fn step_of(&mut self, seqs: &[usize], graphs: Option<&mut StepGraphs>) -> Vec<f32> {
        let rows = LogitRows {
            whole: (0..seqs.len()).collect(),
            ..LogitRows::default()
        };
        self.forward(seqs, &rows, graphs).whole
    }

    /// A decode step of sequences `seqs` that brings back the picks of their rows (greedy).
    fn step_picked(&mut self, seqs: &[usize], graphs: Option<&mut StepGraphs>) -> Vec<Pick> {
        let rows = LogitRows {
            whole: vec![],
            picked: (0..seqs.len()).map(|r| (r, NO_TARGET)).collect(),
            ..LogitRows::default()
        };
        self.forward(seqs, &rows, graphs).picks
    }

    fn forward(
        &mut self,
        seqs: &[usize],
        rows: &LogitRows,
        graphs: Option<&mut StepGraphs>,
    ) -> StepOutput {
        let at: Vec<(usize, usize)> = seqs.iter().map(|&s| (s, self.lens[s])).collect();
        let batch = decode_layout(&at);
        let tokens: Vec<u32> = at
            .iter()
            .map(|&(s, n)| ((n * 5 + s) % 200 + 1) as u32)
            .collect();
        let (m, kv) = (&self.model, &mut self.kv);
        let out = m.forward_with_graphs(&self.be, &tokens, &batch, kv, rows, graphs);
        for &s in seqs {
            self.lens[s] += 1;
        }
        out.unwrap()
    }

    /// The KV cache's values, brought back.
    fn kv_values(&mut self) -> Vec<Vec<f32>> {
        let mut planes = Vec::new();
        for layer in self.kv.iter_mut() {
            let (k, v) = layer.host_pools().unwrap();
            planes.extend([k.to_f32(), v.to_f32()]);
        }
        planes
    }
}

/// A fresh runtime of each kind here: the emulator, and GPU 0 when usable.
type NewRuntime = fn() -> Arc<dyn KernelRuntime>;

fn runtimes() -> Vec<(&'static str, NewRuntime)> {
    let mut kinds: Vec<(&'static str, NewRuntime)> =
        vec![("emulator", || Arc::new(EmuRuntime::new().unwrap()))];
    match driver::probe(0) {
        Ok(()) => kinds.push(("cuda:0", || {
            Arc::new(driver::CudaRuntime::new(0).expect("GPU 0 probed usable"))
        })),
        Err(e) if std::env::var_os("VELLUM_REQUIRE_GPU").is_some() => {
            panic!("VELLUM_REQUIRE_GPU is set but GPU 0 is unusable: {e}")
        }
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "GPU check SKIPPED (emulator only): {e}");
        }
    }
    kinds
}

fn counted(new: NewRuntime) -> Arc<Counting> {
    Arc::new(Counting::new(new()))
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Two sequences (120 and 30 tokens) decode 12 steps together, replayed on one backend and
/// op by op on another. The longer one crosses 128 keys at the 9th step: a new attention
/// split and a wider block table, so a second shape, recorded in turn.
#[test]
fn replayed_decode_steps_give_the_op_by_op_bits_in_one_launch() {
    for (device, new) in runtimes() {
        let graphs = replays_give_the_op_by_op_bits(device, new, StepGraphs::default());
        assert_eq!((graphs.stats.evicted, graphs.len()), (0, 2), "{device}");
    }
}

/// As above, with a memory budget that holds one recording: the second shape's recording
/// drops the first's.
#[test]
fn recordings_past_the_memory_budget_are_dropped_least_recently_used_first() {
    let (device, new) = runtimes()[0];
    let graphs = replays_give_the_op_by_op_bits(device, new, StepGraphs::with_budget(1));
    assert_eq!((graphs.stats.evicted, graphs.len()), (1, 1));
    assert!(graphs.bytes() > 0);
}

fn replays_give_the_op_by_op_bits(
    device: &str,
    new: NewRuntime,
    mut graphs: StepGraphs,
) -> StepGraphs {
    let counted = counted(new);
    let mut graphed = Decoder::new(counted.clone(), &[120, 30]);
    let mut op_by_op = Decoder::new(self::counted(new), &[120, 30]);
    let vocab = graphed.model.config.vocab_size;
    for step in 0..12 {
        counted.take_launches();
        counted.take_graph_launches();
        counted.take_allocated();
        counted.take_uploaded();
        counted.take_copies();
        let got = graphed.step(Some(&mut graphs));
        if step == 3 {
            // A replay whose block tables are those of the step before.
            assert_eq!(
                counted.take_launches(),
                0,
                "{device}: kernels launched one by one"
            );
            assert_eq!(
                counted.take_graph_launches(),
                1,
                "{device}: graphs launched"
            );
            assert_eq!(counted.take_allocated(), 0, "{device}: bytes allocated");
            assert_eq!(
                counted.take_copies(),
                2,
                "{device}: the inputs up, the output down"
            );
            let sent = counted.take_uploaded();
            // The tokens, positions and slots, packed 16 bytes apart, as far as they changed.
            assert!((1..=40).contains(&sent), "{device}: {sent} bytes sent");
        }
        let want = op_by_op.step(None);
        assert_eq!(got.len(), 2 * vocab);
        assert!(
            same_bits(&got, &want),
            "{device}, step {step}: log-probabilities differ from the op-by-op step's"
        );
    }
    let stats = GraphStats {
        recorded: 2,
        replayed: 8,
        op_by_op: 2,
        failed: 0,
        ..graphs.stats
    };
    assert_eq!(
        graphs.stats, stats,
        "{device}: one shape up to 128 keys, one past"
    );
    assert!(
        graphed.kv_values() == op_by_op.kv_values(),
        "{device}: the replays' KV cache differs from the op-by-op one"
    );
    graphs
}

/// Continuous batching changes the batch size as sequences come and go: decode batches of
/// any 3 of 4 sequences, or all 4, are padded to 4 and replay one recording, with the bits
/// of the unpadded steps op by op; the padding writes no KV.
#[test]
fn decode_batches_of_changing_sizes_replay_the_recording_of_their_padded_size() {
    for (device, new) in runtimes() {
        let prompts = [20, 9, 33, 14];
        let counted = counted(new);
        let mut graphed = Decoder::new(counted.clone(), &prompts);
        let mut op_by_op = Decoder::new(self::counted(new), &prompts);
        let vocab = graphed.model.config.vocab_size;
        let mut graphs = StepGraphs::default();
        let batches: [&[usize]; 6] = [
            &[0, 1, 2],
            &[0, 1, 2, 3],
            &[1, 2, 3],
            &[0, 2, 3],
            &[3, 0, 1],
            &[0, 1, 2, 3],
        ];
        for (step, seqs) in batches.into_iter().enumerate() {
            counted.take_launches();
            let got = graphed.step_of(seqs, Some(&mut graphs));
            if step >= 2 {
                assert_eq!(counted.take_launches(), 0, "{device}, step {step}");
            }
            let want = op_by_op.step_of(seqs, None);
            assert_eq!(got.len(), seqs.len() * vocab, "{device}: rows returned");
            assert!(
                same_bits(&got, &want),
                "{device}, step {step}: log-probabilities differ from the unpadded step's"
            );
        }
        let stats = GraphStats {
            recorded: 1,
            replayed: 4,
            op_by_op: 1,
            failed: 0,
            evicted: 0,
        };
        assert_eq!(graphs.stats, stats, "{device}: one shape, of 4 sequences");
        assert!(graphed.kv_values() == op_by_op.kv_values(), "{device}");
    }
}

/// A greedy decode batch brings back picks (argmax and its log-probability), not rows: its
/// recording too, padded, in one launch, bringing back 8 bytes a sequence; the picks are
/// those of the op-by-op rows.
#[test]
fn greedy_decode_steps_replay_with_picked_rows() {
    for (device, new) in runtimes() {
        let prompts = [20, 9, 33];
        let counted = counted(new);
        let mut graphed = Decoder::new(counted.clone(), &prompts);
        let mut op_by_op = Decoder::new(self::counted(new), &prompts);
        let vocab = graphed.model.config.vocab_size;
        let mut graphs = StepGraphs::default();
        for step in 0..4 {
            counted.take_launches();
            counted.take_downloaded();
            let got = graphed.step_picked(&[0, 1, 2], Some(&mut graphs));
            if step >= 2 {
                assert_eq!(counted.take_launches(), 0, "{device}, step {step}");
                assert_eq!(counted.take_downloaded(), 3 * 8, "{device}: bytes down");
            }
            let rows = op_by_op.step_of(&[0, 1, 2], None);
            let want: Vec<Pick> = rows
                .chunks_exact(vocab)
                .map(|row| pick(row, NO_TARGET))
                .collect();
            assert_eq!(got, want, "{device}, step {step}");
        }
        assert_eq!((graphs.stats.recorded, graphs.stats.replayed), (1, 2));
    }
}

/// A decode batch whose sequences sample differently (one needs its whole row, two only
/// picks, one of them with its ranked candidates) replays too: its rows all come back whole,
/// the picks and candidates taken from them on the host.
#[test]
fn decode_steps_with_whole_and_picked_rows_replay() {
    let (device, new) = runtimes()[0];
    let prompts = [20, 9, 33];
    let mut graphed = Decoder::new(counted(new), &prompts);
    let mut op_by_op = Decoder::new(counted(new), &prompts);
    let vocab = graphed.model.config.vocab_size;
    let mut graphs = StepGraphs::default();
    let mixed = LogitRows {
        whole: vec![1],
        picked: vec![(0, NO_TARGET), (2, 7)],
        ranked: vec![0],
        top: 4,
        ..LogitRows::default()
    };
    for step in 0..4 {
        let got = graphed.forward(&[0, 1, 2], &mixed, Some(&mut graphs));
        let rows = op_by_op.step_of(&[0, 1, 2], None);
        let row = |r: usize| &rows[r * vocab..(r + 1) * vocab];
        assert!(same_bits(&got.whole, row(1)), "{device}, step {step}");
        let want = [pick(row(0), NO_TARGET), pick(row(2), 7)];
        assert_eq!(got.picks, want, "{device}, step {step}");
        let candidates = vellum::kernels::pick::top_pairs(row(0), 4);
        assert_eq!(got.ranked, [candidates], "{device}, step {step}");
    }
    assert_eq!((graphs.stats.recorded, graphs.stats.replayed), (1, 2));
}

/// A recording whose KV pools moved (here: brought home for a host write) no longer
/// applies. Recording the shape again then fails once, since the pools must go up first,
/// which a recording cannot do: that step runs op by op, which puts them there, and the
/// next one records.
#[test]
fn a_step_whose_recording_fails_runs_op_by_op_and_the_next_one_records() {
    for (device, new) in runtimes() {
        a_failed_recording_runs_op_by_op(device, new);
    }
}

fn a_failed_recording_runs_op_by_op(device: &str, new: NewRuntime) {
    let mut graphed = Decoder::new(counted(new), &[20, 9]);
    let mut op_by_op = Decoder::new(counted(new), &[20, 9]);
    let mut graphs = StepGraphs::default();
    for step in 0..7 {
        if step == 4 {
            for d in [&mut graphed, &mut op_by_op] {
                for layer in d.kv.iter_mut() {
                    layer.pools_mut().unwrap();
                }
            }
        }
        let (got, want) = (graphed.step(Some(&mut graphs)), op_by_op.step(None));
        assert!(same_bits(&got, &want), "{device}, step {step}");
    }
    let stats = GraphStats {
        recorded: 2, // steps 1 and 5
        replayed: 3, // steps 2, 3 and 6
        op_by_op: 2, // steps 0 and 4
        failed: 1,   // step 4
        evicted: 0,
    };
    assert_eq!(graphs.stats, stats, "{device}");
    assert!(graphed.kv_values() == op_by_op.kv_values(), "{device}");
}

/// Through the engine: three requests, finishing one after another (decode batches of 3, 2
/// and 1), generate the same tokens and log-probabilities with recorded steps as without.
#[test]
fn an_engine_generates_the_same_with_recorded_steps() {
    use vellum::engine::{Engine, EngineConfig, Request};
    use vellum::kernels::Device;
    let dir = repo().join("tests/golden/models/llama_gqa");
    let run = |step_graphs: bool| {
        let mut engine = Engine::builder()
            .device(Device::CudaEmulator)
            .model(&dir)
            .config(EngineConfig {
                kv_cache_bytes: 4 << 20,
                step_graphs,
                ..EngineConfig::default()
            })
            .build()
            .unwrap();
        let requests = [(17, 4), (5, 8), (30, 12)]
            .into_iter()
            .map(|(len, n)| Request::tokens((1..=len).collect(), greedy(n)))
            .collect();
        let done = engine.generate(requests).unwrap();
        (done, engine.graph_stats().cloned())
    };
    let ((with, stats_with), (without, none)) = (run(true), run(false));
    assert_eq!(none, None);
    // One prefill step, then 2, 4 and 4 decode steps of 3, 2 and 1 sequences: each shape's
    // first runs op by op, its second is recorded, the rest replay it.
    let stats = GraphStats {
        recorded: 3,
        replayed: 1 + 2 + 2,
        op_by_op: 1 + 3,
        failed: 0,
        evicted: 0,
    };
    assert_eq!(stats_with.unwrap(), stats);
    for (a, b) in with.iter().zip(&without) {
        assert_eq!(a.tokens, b.tokens);
        let bits = |o: &vellum::engine::Completion| -> Vec<u32> {
            o.logprobs.iter().map(|l| l.logprob.to_bits()).collect()
        };
        assert_eq!(bits(a), bits(b), "log-probabilities");
    }
}
