//! The Llama-family decoder (Llama, Mistral, Qwen2) as a sequence of backend ops over a
//! ragged batch and a paged KV cache.

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::graphs::{StepGraphs, StepTensors};
use crate::tensors::{TensorFormat, TensorInfo, TensorStore};
use half::{bf16, f16};
use std::collections::BTreeMap;
use std::path::Path;
use vellum_kernels::{
    pick::{pick, ranked_pairs, top_pairs},
    Backend, BatchLayout, KvDtype, KvLayer, MatmulPart, Pick, QuantTarget, Rope, StepInputs,
    Tensor, Weight, WeightData, NO_TARGET,
};
use vellum_quant::ggml::Repacked;
use vellum_quant::DType;

/// One decoder layer's weights. The norms' weights and the biases are [`Tensor`]s, which a
/// GPU backend keeps on its device after their first use.
#[derive(Clone)]
pub struct Layer {
    pub attn_norm: Tensor,
    pub q: Weight,
    pub k: Weight,
    pub v: Weight,
    pub q_bias: Option<Tensor>,
    pub k_bias: Option<Tensor>,
    pub v_bias: Option<Tensor>,
    pub o: Weight,
    pub mlp_norm: Tensor,
    pub gate: Weight,
    pub up: Weight,
    pub down: Weight,
}

/// Hugging Face names of a layer's linear weights, in the order of [`Layer::linears`].
pub const LINEAR_NAMES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// The activations a layer's linear weights read; weights that read the same one share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinearInput {
    /// The normed residual, read by Q, K and V.
    Attention,
    /// The attention heads' output, read by O.
    AttentionOutput,
    /// The normed residual, read by gate and up.
    Mlp,
    /// `silu(gate) * up`, read by down.
    MlpDown,
}

/// Sees each layer's linear inputs during a forward pass: `(layer, input, [tokens, cols])`
/// (brought to the host for it).
pub type LinearInputObserver<'a> = dyn FnMut(usize, LinearInput, &[f32]) + 'a;

impl LinearInput {
    pub const ALL: [LinearInput; 4] = [
        LinearInput::Attention,
        LinearInput::AttentionOutput,
        LinearInput::Mlp,
        LinearInput::MlpDown,
    ];

    /// The input of each of [`Layer::linears`], in order.
    pub const OF_LINEARS: [LinearInput; 7] = [
        LinearInput::Attention,
        LinearInput::Attention,
        LinearInput::Attention,
        LinearInput::AttentionOutput,
        LinearInput::Mlp,
        LinearInput::Mlp,
        LinearInput::MlpDown,
    ];
}

impl Layer {
    /// The linear weights, in the order of [`LINEAR_NAMES`].
    pub fn linears(&self) -> [&Weight; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }

    pub fn linears_mut(&mut self) -> [&mut Weight; 7] {
        [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }
}

/// A loaded model: config, weights and rotary tables.
#[derive(Clone)]
pub struct Model {
    pub config: ModelConfig,
    pub embed: Weight,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// `None` when the embeddings are tied.
    pub lm_head: Option<Weight>,
    pub rope: Rope,
}

/// Where the tensors come from decides a few conventions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorLayout {
    HuggingFace,
    /// llama.cpp permutes the rows of Q and K for its rotary layout; undone at load.
    GgufLlama,
}

/// Builds a `Weight` from a tensor's bytes, checking format and shape.
pub fn weight_from_tensor(info: &TensorInfo, bytes: &[u8]) -> std::result::Result<Weight, String> {
    let (rows, cols) = match info.shape.as_slice() {
        [r, c] => (*r, *c),
        [n] => (1, *n),
        s => return Err(format!("expected a matrix, shape is {s:?}")),
    };
    let data = match info.format {
        TensorFormat::Dense(DType::F32) => WeightData::F32(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        TensorFormat::Dense(DType::F16) => WeightData::F16(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        TensorFormat::Dense(DType::BF16) => WeightData::BF16(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        TensorFormat::Block(f) => WeightData::Block(f, bytes.to_vec()),
        // No kernels run these formats: re-expressed in one that does (Q5_0, Q4_K), else
        // decoded once to f16 (an f32 value rounded to f16's 11 bits, well within what the
        // format itself lost).
        TensorFormat::Decoded(f) => {
            if !cols.is_multiple_of(f.block_values()) {
                return Err(format!(
                    "{cols} columns are not whole {} blocks of {} values",
                    f.name(),
                    f.block_values()
                ));
            }
            match f.repack(bytes, rows, cols).map_err(|e| e.to_string())? {
                Some(Repacked::Block(format, bytes)) => WeightData::Block(format, bytes),
                Some(Repacked::Int4(format, data)) => WeightData::Int4(format, data),
                None => {
                    let mut values = Vec::new();
                    f.dequantize(bytes, rows * cols, &mut values)
                        .map_err(|e| e.to_string())?;
                    WeightData::F16(values.into_iter().map(f16::from_f32).collect())
                }
            }
        }
        TensorFormat::U8 | TensorFormat::I8 => {
            return Err(format!(
                "{} bytes are quantized values: only linear layers of a checkpoint with a quantization_config may hold them",
                info.format.name()
            ))
        }
    };
    Weight::new(rows, cols, data).map_err(|e| e.to_string())
}

/// Reorders the rows of a llama.cpp-permuted Q or K weight back to Hugging Face order.
///
/// llama.cpp stores, per head, the rotary pairs interleaved: HF row `s * hd/2 + j` of a head
/// (`s` = which half) sits at row `2j + s`. Rows are moved whole, so block-quantized rows
/// are reordered without requantizing.
pub fn unpermute_rows(w: &Weight, n_head: usize) -> std::result::Result<Weight, String> {
    if n_head == 0 || !w.rows.is_multiple_of(n_head) || !(w.rows / n_head).is_multiple_of(2) {
        return Err(format!(
            "{} rows cannot be split into {n_head} heads of even size",
            w.rows
        ));
    }
    let hd = w.rows / n_head;
    let src_row = |r: usize| {
        let (h, i) = (r / hd, r % hd);
        let (s, j) = (i / (hd / 2), i % (hd / 2));
        h * hd + 2 * j + s
    };
    fn permute<T: Copy>(v: &[T], rows: usize, src_row: impl Fn(usize) -> usize) -> Vec<T> {
        let width = v.len() / rows;
        (0..rows)
            .flat_map(|r| {
                v[src_row(r) * width..(src_row(r) + 1) * width]
                    .iter()
                    .copied()
            })
            .collect()
    }
    let data = match &w.data {
        WeightData::F32(v) => WeightData::F32(permute(v, w.rows, src_row)),
        WeightData::F16(v) => WeightData::F16(permute(v, w.rows, src_row)),
        WeightData::BF16(v) => WeightData::BF16(permute(v, w.rows, src_row)),
        WeightData::Block(f, v) => WeightData::Block(*f, permute(v, w.rows, src_row)),
        WeightData::Int8PerRow { q, scales } => WeightData::Int8PerRow {
            q: permute(q, w.rows, src_row),
            scales: permute(scales, w.rows, src_row),
        },
        WeightData::Int4(f, d) => WeightData::Int4(
            *f,
            vellum_quant::Int4Data {
                packed: permute(&d.packed, w.rows, src_row),
                scales: permute(&d.scales, w.rows, src_row),
                mins: permute(&d.mins, w.rows, src_row),
            },
        ),
        WeightData::Rows16(_) => {
            return Err("a weight repacked for a backend cannot be reordered".into());
        }
    };
    Weight::new(w.rows, w.cols, data).map_err(|e| e.to_string())
}

struct Loader<'a> {
    store: &'a TensorStore,
    path: &'a Path,
}

impl Loader<'_> {
    fn err(&self, name: &str, msg: impl Into<String>) -> EngineError {
        EngineError::Tensor {
            path: self.store.path_of(name).unwrap_or(self.path).to_path_buf(),
            tensor: name.to_string(),
            msg: msg.into(),
        }
    }

    /// A tensor's mapped bytes. Each caller copies them into a weight, then releases the
    /// tensor's pages (`TensorStore::release`).
    fn get(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        self.store
            .get(name)
            .ok_or_else(|| self.err(name, "missing from the checkpoint"))
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        let (info, bytes) = self.get(name)?;
        if info.shape != [rows, cols] {
            return Err(self.err(
                name,
                format!(
                    "shape {:?} does not match the config, expected [{rows}, {cols}]",
                    info.shape
                ),
            ));
        }
        let w = weight_from_tensor(info, bytes).map_err(|m| self.err(name, m));
        self.store.release(name);
        w
    }

    /// A linear layer: dense, or in the checkpoint's quantized format (written by
    /// `vellum quantize`: int8 as `I8 [rows, cols]` + `F32 [rows]` `*_scale`; group-32 blocks
    /// as `U8 [rows, bytes per row]`; planar int4 as `U8 [rows, cols / 2]` codes +
    /// `F16 [rows, groups]` `*_scale` (+ `*_min` when asymmetric)).
    fn linear(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        quant: Option<QuantTarget>,
    ) -> Result<Weight> {
        let Some(target) = quant else {
            return self.matrix(name, rows, cols);
        };
        let (info, bytes) = self.get(name)?;
        let expect = |format: TensorFormat, shape: [usize; 2]| -> Result<()> {
            if info.format != format || info.shape != shape {
                return Err(self.err(
                    name,
                    format!(
                        "{} {:?} does not match the {} quantization_config, expected {} {shape:?}",
                        info.format.name(),
                        info.shape,
                        target.name(),
                        format.name()
                    ),
                ));
            }
            Ok(())
        };
        let data = match target {
            QuantTarget::Int8PerChannel => {
                expect(TensorFormat::I8, [rows, cols])?;
                let scale_name = format!("{name}_scale");
                let scales = self.vector(&scale_name, rows)?;
                WeightData::Int8PerRow {
                    q: bytes.iter().map(|&b| b as i8).collect(),
                    scales,
                }
            }
            QuantTarget::Block(f) => {
                let row_bytes = f
                    .bytes_for(cols)
                    .map_err(|e| self.err(name, e.to_string()))?;
                expect(TensorFormat::U8, [rows, row_bytes])?;
                WeightData::Block(f, bytes.to_vec())
            }
            QuantTarget::Int4(f, _) => {
                let groups = f.groups(cols).map_err(|e| self.err(name, e.to_string()))?;
                expect(TensorFormat::U8, [rows, cols / 2])?;
                let mins = if f.symmetric {
                    Vec::new()
                } else {
                    self.f16_matrix(&format!("{name}_min"), rows, groups)?
                };
                let data = vellum_quant::Int4Data {
                    packed: bytes.to_vec(),
                    scales: self.f16_matrix(&format!("{name}_scale"), rows, groups)?,
                    mins,
                };
                WeightData::Int4(f, data)
            }
        };
        self.store.release(name);
        Weight::new(rows, cols, data).map_err(|e| self.err(name, e.to_string()))
    }

    /// A `[rows, cols]` F16 tensor's values (int4 scales and offsets).
    fn f16_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<half::f16>> {
        match self.matrix(name, rows, cols)?.data {
            WeightData::F16(v) => Ok(v),
            _ => Err(self.err(name, "must be F16 (int4 scales and offsets)")),
        }
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (info, bytes) = self.get(name)?;
        if info.shape != [len] {
            return Err(self.err(
                name,
                format!(
                    "shape {:?} does not match the config, expected [{len}]",
                    info.shape
                ),
            ));
        }
        let w = weight_from_tensor(info, bytes).map_err(|m| self.err(name, m))?;
        self.store.release(name);
        Ok(w.to_f32())
    }
}

impl Model {
    /// Loads and checks every tensor the config calls for.
    pub fn load(
        config: ModelConfig,
        store: &TensorStore,
        path: &Path,
        layout: TensorLayout,
    ) -> Result<Model> {
        let l = Loader { store, path };
        let decoded: BTreeMap<String, usize> = store
            .infos()
            .filter(|t| matches!(t.format, TensorFormat::Decoded(f) if !f.repacks()))
            .fold(BTreeMap::new(), |mut m, t| {
                *m.entry(t.format.name()).or_default() += 1;
                m
            });
        if !decoded.is_empty() {
            let list: Vec<String> = decoded.iter().map(|(f, n)| format!("{n} {f}")).collect();
            tracing::warn!(
                "{} tensors decoded to f16 at load: Vellum has no kernels for these formats \
                 (about 3-4x their memory; --quant int4 or q8_0 requantizes them)",
                list.join(", ")
            );
        }
        let c = &config;
        let (h, f) = (c.hidden_size, c.intermediate_size);
        let embed = l.matrix("model.embed_tokens.weight", c.vocab_size, h)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(l.matrix("lm_head.weight", c.vocab_size, h)?)
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let mut q = l.linear(
                &format!("{p}.self_attn.q_proj.weight"),
                c.q_width(),
                h,
                c.quantization,
            )?;
            let mut k = l.linear(
                &format!("{p}.self_attn.k_proj.weight"),
                c.kv_width(),
                h,
                c.quantization,
            )?;
            if layout == TensorLayout::GgufLlama {
                q = unpermute_rows(&q, c.num_heads)
                    .map_err(|m| l.err(&format!("{p}.self_attn.q_proj.weight"), m))?;
                k = unpermute_rows(&k, c.num_kv_heads)
                    .map_err(|m| l.err(&format!("{p}.self_attn.k_proj.weight"), m))?;
            }
            let bias = |name: &str, n: usize| -> Result<Option<Tensor>> {
                if c.attention_bias {
                    let b = l.vector(&format!("{p}.self_attn.{name}.bias"), n)?;
                    Ok(Some(b.into()))
                } else {
                    Ok(None)
                }
            };
            layers.push(Layer {
                attn_norm: l.vector(&format!("{p}.input_layernorm.weight"), h)?.into(),
                q,
                k,
                v: l.linear(
                    &format!("{p}.self_attn.v_proj.weight"),
                    c.kv_width(),
                    h,
                    c.quantization,
                )?,
                q_bias: bias("q_proj", c.q_width())?,
                k_bias: bias("k_proj", c.kv_width())?,
                v_bias: bias("v_proj", c.kv_width())?,
                o: l.linear(
                    &format!("{p}.self_attn.o_proj.weight"),
                    h,
                    c.q_width(),
                    c.quantization,
                )?,
                mlp_norm: l
                    .vector(&format!("{p}.post_attention_layernorm.weight"), h)?
                    .into(),
                gate: l.linear(&format!("{p}.mlp.gate_proj.weight"), f, h, c.quantization)?,
                up: l.linear(&format!("{p}.mlp.up_proj.weight"), f, h, c.quantization)?,
                down: l.linear(&format!("{p}.mlp.down_proj.weight"), h, f, c.quantization)?,
            });
        }
        let norm = l.vector("model.norm.weight", h)?.into();
        let rope = Rope::new(c.head_dim, c.rope_theta, &c.rope_scaling);
        Ok(Model {
            config,
            embed,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    /// Quantizes the linear layers (attention and MLP projections) to `target`. Embeddings
    /// and norms stay as loaded; an untied LM head stays as loaded too (it decides every
    /// token, and is read once per step like any other matrix: the accuracy is worth more
    /// than its share of the bytes).
    pub fn quantize_linears(&mut self, target: QuantTarget) -> Result<()> {
        for l in &mut self.layers {
            for w in l.linears_mut() {
                *w = w.quantize(target)?;
            }
        }
        self.config.quantization = Some(target);
        Ok(())
    }

    /// Hands every matrix a matmul reads (the linear layers and the LM head, which is the
    /// embedding table when tied) to `backend` to bring into its layout
    /// (`Backend::prepare_weight`), and the embedding table to bring where lookups read it
    /// (`Backend::prepare_embedding`): once, at load, the weights in parallel.
    pub fn prepare_for(&mut self, backend: &dyn Backend) -> Result<()> {
        use rayon::prelude::*;
        let mut weights: Vec<&mut Weight> = self
            .layers
            .iter_mut()
            .flat_map(|l| l.linears_mut())
            .collect();
        weights.push(self.lm_head.as_mut().unwrap_or(&mut self.embed));
        weights
            .into_par_iter()
            .try_for_each(|w| backend.prepare_weight(w))?;
        backend.prepare_embedding(&mut self.embed)?;
        Ok(())
    }

    /// Converts every weight matrix (embeddings and LM head included) to dense `dtype`,
    /// dequantizing quantized ones.
    pub fn to_dtype(&mut self, dtype: DType) -> Result<()> {
        self.embed = self.embed.to_dense(dtype)?;
        if let Some(h) = &mut self.lm_head {
            *h = h.to_dense(dtype)?;
        }
        for l in &mut self.layers {
            for w in l.linears_mut() {
                *w = w.to_dense(dtype)?;
            }
        }
        self.config.quantization = None;
        Ok(())
    }

    /// A KV cache of `num_blocks` blocks of `block_size` tokens for every layer.
    pub fn new_kv_cache(
        &self,
        num_blocks: usize,
        block_size: usize,
        dtype: KvDtype,
    ) -> Vec<KvLayer> {
        let c = &self.config;
        (0..c.num_layers)
            .map(|_| KvLayer::new(num_blocks, block_size, c.num_kv_heads, c.head_dim, dtype))
            .collect()
    }

    /// Bytes of KV cache one token takes across all layers (K and V).
    pub fn kv_bytes_per_token(&self, dtype: KvDtype) -> usize {
        let c = &self.config;
        2 * c.num_layers * dtype.slot_bytes(c.num_kv_heads, c.head_dim)
    }

    /// Bytes of weights read by one forward step.
    pub fn weight_bytes(&self) -> usize {
        let per_layer = |l: &Layer| l.linears().iter().map(|w| w.bytes()).sum::<usize>();
        let head = self.lm_head.as_ref().unwrap_or(&self.embed).bytes();
        self.layers.iter().map(per_layer).sum::<usize>() + head
    }

    pub fn lm_head(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Runs one step over a ragged batch: writes the new tokens' K/V into `kv` and returns
    /// log-probabilities (`[logit_rows.len(), vocab]`) for the requested token rows.
    pub fn forward(
        &self,
        backend: &dyn Backend,
        tokens: &[u32],
        batch: &BatchLayout,
        kv: &mut [KvLayer],
        logit_rows: &[usize],
    ) -> Result<Vec<f32>> {
        let rows = LogitRows {
            whole: logit_rows.to_vec(),
            ..LogitRows::default()
        };
        Ok(self
            .forward_with_graphs(backend, tokens, batch, kv, &rows, None)?
            .whole)
    }

    /// [`Model::forward`], bringing back `rows`' whole rows and picks, with decode steps
    /// recorded and replayed through `graphs` where the backend can (CUDA graphs): the same
    /// values, fewer launches.
    pub fn forward_with_graphs(
        &self,
        backend: &dyn Backend,
        tokens: &[u32],
        batch: &BatchLayout,
        kv: &mut [KvLayer],
        rows: &LogitRows,
        graphs: Option<&mut StepGraphs>,
    ) -> Result<StepOutput> {
        let c = &self.config;
        let t = tokens.len();
        if batch.num_tokens() != t || kv.len() != c.num_layers {
            return Err(EngineError::Kernel(vellum_kernels::KernelError::Shape {
                op: "forward",
                detail: format!(
                    "{t} tokens, {} positions, {} cache layers",
                    batch.num_tokens(),
                    kv.len()
                ),
            }));
        }
        let vocab = c.vocab_size;
        let mut step = |inputs: &StepInputs, kv: &mut [KvLayer]| -> Result<StepTensors> {
            let mut acts = self.embed_tokens(backend, inputs.tokens)?;
            for (i, cache) in kv.iter_mut().enumerate() {
                self.layer_forward(backend, i, &mut acts, inputs.batch, cache, None)?;
            }
            let token_rows: Vec<usize> = inputs.rows.iter().map(|&r| r as usize).collect();
            let logprobs = self.logits(backend, &acts, &token_rows)?;
            let picks = match inputs.targets {
                [] => None,
                targets => {
                    let mut picks = Tensor::zeros(2 * targets.len());
                    backend.pick_rows(&logprobs, vocab, targets, &mut picks)?;
                    Some(picks)
                }
            };
            Ok(StepTensors { logprobs, picks })
        };
        // Whole rows first, then the picked ones.
        let whole = rows.whole.iter().map(|&r| r as u32);
        let token_rows: Vec<u32> = whole
            .chain(rows.picked.iter().map(|&(r, _)| r as u32))
            .collect();
        let targets: Vec<u32> = match rows.picked.is_empty() {
            true => vec![],
            false => std::iter::repeat_n(NO_TARGET, rows.whole.len())
                .chain(rows.picked.iter().map(|&(_, t)| t))
                .collect(),
        };
        let inputs = StepInputs {
            tokens,
            batch,
            rows: &token_rows,
            targets: &targets,
            padding: 0,
        };
        let mixed = !rows.whole.is_empty() && !rows.picked.is_empty();
        let one_kind = !mixed && rows.ranked.is_empty();
        if rows.picks_on_host || (!one_kind && graphs.is_some()) {
            // Every row comes back whole, in token order (a recorded step brings back one
            // kind of row), and the picks and candidates are taken from them here.
            let mut order: Vec<usize> = rows.whole.clone();
            order.extend(rows.picked.iter().map(|&(r, _)| r));
            order.sort_unstable();
            let token_rows: Vec<u32> = order.iter().map(|&r| r as u32).collect();
            let inputs = StepInputs {
                rows: &token_rows,
                targets: &[],
                ..inputs
            };
            let back = match graphs {
                Some(graphs) => graphs.run(backend, &inputs, kv, &mut step)?,
                None => step(&inputs, kv)?.logprobs.to_vec()?,
            };
            let row = |r: &usize| {
                let i = order.binary_search(r).unwrap_or_else(|i| i);
                &back[i * vocab..(i + 1) * vocab]
            };
            return Ok(StepOutput {
                whole: rows.whole.iter().flat_map(row).copied().collect(),
                picks: rows.picked.iter().map(|(r, t)| pick(row(r), *t)).collect(),
                ranked: rows
                    .ranked
                    .iter()
                    .map(|&i| top_pairs(row(&rows.picked[i].0), rows.top))
                    .collect(),
            });
        }
        match graphs {
            Some(graphs) if rows.whole.is_empty() => {
                let back = graphs.run(backend, &inputs, kv, &mut step)?;
                Ok(StepOutput {
                    picks: Pick::from_values(&back),
                    ..StepOutput::default()
                })
            }
            Some(graphs) => Ok(StepOutput {
                whole: graphs.run(backend, &inputs, kv, &mut step)?,
                ..StepOutput::default()
            }),
            None => {
                let out = step(&inputs, kv)?;
                let whole = out.logprobs.first(rows.whole.len() * vocab)?;
                let picks = match &out.picks {
                    Some(p) => Pick::from_values(&p.to_vec()?[2 * rows.whole.len()..]),
                    None => vec![],
                };
                let ranked = self.ranked_rows(backend, &out.logprobs, rows)?;
                Ok(StepOutput {
                    whole,
                    picks,
                    ranked,
                })
            }
        }
    }

    /// The candidates of `rows.ranked` (`Backend::top_rows`), from a step's log-probabilities
    /// (whole rows first, then the picked ones).
    fn ranked_rows(
        &self,
        backend: &dyn Backend,
        logprobs: &Tensor,
        rows: &LogitRows,
    ) -> Result<Vec<Vec<(u32, f32)>>> {
        if rows.ranked.is_empty() {
            return Ok(vec![]);
        }
        let at: Vec<u32> = rows
            .ranked
            .iter()
            .map(|&i| (rows.whole.len() + i) as u32)
            .collect();
        let mut out = Tensor::zeros(2 * rows.top * at.len());
        backend.top_rows(logprobs, self.config.vocab_size, &at, rows.top, &mut out)?;
        let values = out.to_vec()?;
        Ok(values
            .chunks_exact(2 * rows.top)
            .map(ranked_pairs)
            .collect())
    }

    /// The activations entering layer 0: the embeddings of `tokens`.
    pub fn embed_tokens(&self, backend: &dyn Backend, tokens: &[u32]) -> Result<Activations> {
        let mut acts = Activations::new(&self.config, tokens.len());
        backend.embedding(&self.embed, tokens, &mut acts.residual)?;
        Ok(acts)
    }

    /// Runs layer `i` over `acts` (its K/V into `cache`), handing `observe` the input of each
    /// group of its linear weights (`[tokens, cols]`): how calibration sees the activations.
    pub fn layer_forward(
        &self,
        backend: &dyn Backend,
        i: usize,
        acts: &mut Activations,
        batch: &BatchLayout,
        cache: &mut KvLayer,
        mut observe: Option<&mut LinearInputObserver>,
    ) -> Result<()> {
        let observed = observe.is_some();
        let mut seen = |input: LinearInput, x: &Tensor| -> Result<()> {
            if let Some(o) = observe.as_mut() {
                o(i, input, &x.host()?);
            }
            Ok(())
        };
        let (c, layer) = (&self.config, &self.layers[i]);
        let a = acts;
        let d = a.has_delta.then_some(&a.delta);
        backend.add_rms_norm(
            &mut a.residual,
            d,
            &layer.attn_norm,
            c.rms_norm_eps,
            &mut a.normed,
        )?;
        seen(LinearInput::Attention, &a.normed)?;
        backend.matmul_many(
            &a.normed,
            &mut [
                MatmulPart {
                    w: &layer.q,
                    bias: layer.q_bias.as_ref(),
                    out: &mut a.q,
                },
                MatmulPart {
                    w: &layer.k,
                    bias: layer.k_bias.as_ref(),
                    out: &mut a.k,
                },
                MatmulPart {
                    w: &layer.v,
                    bias: layer.v_bias.as_ref(),
                    out: &mut a.v,
                },
            ],
        )?;
        let qkv = (&mut a.q, &mut a.k, &a.v);
        backend.rotary_write_kv(qkv, c.num_heads, &self.rope, cache, batch)?;
        backend.attention(&a.q, cache, batch, c.num_heads, &mut a.attn)?;
        seen(LinearInput::AttentionOutput, &a.attn)?;
        backend.matmul(&a.attn, &layer.o, None, &mut a.delta)?;
        backend.add_rms_norm(
            &mut a.residual,
            Some(&a.delta),
            &layer.mlp_norm,
            c.rms_norm_eps,
            &mut a.normed,
        )?;
        seen(LinearInput::Mlp, &a.normed)?;
        backend.matmul_many(
            &a.normed,
            &mut [
                MatmulPart {
                    w: &layer.gate,
                    bias: None,
                    out: &mut a.gate,
                },
                MatmulPart {
                    w: &layer.up,
                    bias: None,
                    out: &mut a.up,
                },
            ],
        )?;
        if observed {
            // The down projection's input, for the observer.
            backend.silu_mul(&mut a.gate, &a.up)?;
            seen(LinearInput::MlpDown, &a.gate)?;
            backend.matmul(&a.gate, &layer.down, None, &mut a.delta)?;
        } else {
            backend.silu_mul_matmul(&mut a.gate, &a.up, &layer.down, &mut a.delta)?;
        }
        a.has_delta = true;
        Ok(())
    }

    /// Log-probabilities (`[logit_rows.len(), vocab]`) after the last layer, for the given
    /// token rows only: only they go through the final norm and the LM head. Where the
    /// backend computed them (a GPU's memory) until someone reads them.
    pub fn logits(
        &self,
        backend: &dyn Backend,
        acts: &Activations,
        logit_rows: &[usize],
    ) -> Result<Tensor> {
        let c = &self.config;
        let (h, t) = (c.hidden_size, acts.tokens());
        if let Some(&bad) = logit_rows.iter().find(|&&r| r >= t) {
            return Err(EngineError::Kernel(vellum_kernels::KernelError::Shape {
                op: "forward",
                detail: format!("logit row {bad} of {t} tokens"),
            }));
        }
        // Only the selected rows go on to the LM head.
        let rows: Vec<u32> = logit_rows.iter().map(|&r| r as u32).collect();
        let select = |x: &Tensor| -> Result<Tensor> {
            let mut out = Tensor::zeros(rows.len() * h);
            backend.gather_rows(x, h, &rows, &mut out)?;
            Ok(out)
        };
        let mut sel_res = select(&acts.residual)?;
        let sel_delta = acts.has_delta.then(|| select(&acts.delta)).transpose()?;
        let mut sel_norm = Tensor::zeros(sel_res.len());
        backend.add_rms_norm(
            &mut sel_res,
            sel_delta.as_ref(),
            &self.norm,
            c.rms_norm_eps,
            &mut sel_norm,
        )?;
        let mut logits = Tensor::zeros(logit_rows.len() * c.vocab_size);
        backend.matmul(&sel_norm, self.lm_head(), None, &mut logits)?;
        backend.log_softmax(&mut logits, c.vocab_size)?;
        Ok(logits)
    }
}

/// The rows of log-probabilities a step brings back, by token row: whole, or picked (`(row,
/// target)`: the value at `target`, or at the argmax for `NO_TARGET`, and the argmax; see
/// `vellum_kernels::pick`), which on a GPU moves 8 bytes to the host instead of the row.
///
/// Some picked rows also bring back their `top` most likely tokens, ranked
/// (`Backend::top_rows`): `ranked` lists them, by index into `picked`.
#[derive(Debug, Clone, Default)]
pub struct LogitRows {
    pub whole: Vec<usize>,
    pub picked: Vec<(usize, u32)>,
    pub ranked: Vec<usize>,
    pub top: usize,
    /// Bring every row back whole and take the picks on the host: what steps did before
    /// picked rows, a benchmark's baseline (`EngineConfig::picks_on_host`).
    pub picks_on_host: bool,
}

/// What a step brings back for its [`LogitRows`]: the whole rows (`[whole.len(), vocab]`),
/// the picks, and the ranked candidates ((index, value), most likely first), each in the
/// order asked.
#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    pub whole: Vec<f32>,
    pub picks: Vec<Pick>,
    pub ranked: Vec<Vec<(u32, f32)>>,
}

/// A forward pass's activations over `t` tokens: the residual stream between layers and the
/// buffers every layer reuses.
#[derive(Clone)]
pub struct Activations {
    tokens: usize,
    residual: Tensor,
    /// The previous layer's MLP output, added to `residual` by the next norm.
    delta: Tensor,
    has_delta: bool,
    normed: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn: Tensor,
    gate: Tensor,
    up: Tensor,
}

impl Activations {
    fn new(c: &ModelConfig, t: usize) -> Activations {
        let (h, f) = (c.hidden_size, c.intermediate_size);
        Activations {
            tokens: t,
            residual: Tensor::zeros(t * h),
            delta: Tensor::zeros(t * h),
            has_delta: false,
            normed: Tensor::zeros(t * h),
            q: Tensor::zeros(t * c.q_width()),
            k: Tensor::zeros(t * c.kv_width()),
            v: Tensor::zeros(t * c.kv_width()),
            attn: Tensor::zeros(t * c.q_width()),
            gate: Tensor::zeros(t * f),
            up: Tensor::zeros(t * f),
        }
    }

    /// Tokens these activations are for.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
}
