//! Argument checks of the [`crate::Backend`] ops, shared by every backend so that a bad call
//! is the same error (naming the op and the sizes) whichever backend gets it. Each returns
//! the row count the op will work on where there is one.

use crate::{check, BatchLayout, KernelError, KvData, KvLayer, Result, Rope, Tensor, Weight};

/// `out` holds one row per token; every token is a row of the table.
pub fn embedding(table: &Weight, tokens: &[u32], out: &Tensor) -> Result<()> {
    let d = table.cols;
    check("embedding", out.len() == tokens.len() * d, || {
        format!(
            "out has {} floats for {} tokens of width {d}",
            out.len(),
            tokens.len()
        )
    })?;
    match tokens.iter().find(|&&t| t as usize >= table.rows) {
        Some(&token) => Err(KernelError::TokenOutOfRange {
            token,
            rows: table.rows,
        }),
        None => Ok(()),
    }
}

/// Returns the number of rows.
pub fn add_rms_norm(
    residual: &Tensor,
    delta: Option<&Tensor>,
    weight: &Tensor,
    out: &Tensor,
) -> Result<usize> {
    let d = weight.len();
    let ok = d > 0
        && residual.len().is_multiple_of(d)
        && out.len() == residual.len()
        && delta.is_none_or(|x| x.len() == residual.len());
    check("add_rms_norm", ok, || {
        format!(
            "residual {} / out {} floats, width {d}",
            residual.len(),
            out.len()
        )
    })?;
    Ok(residual.len() / d)
}

/// Returns the number of activation rows.
pub fn matmul(x: &Tensor, w: &Weight, bias: Option<&Tensor>, out: &Tensor) -> Result<usize> {
    let (k, n) = (w.cols, w.rows);
    let t = x.len().checked_div(k).unwrap_or(0);
    let ok = k > 0 && x.len() == t * k && out.len() == t * n && bias.is_none_or(|b| b.len() == n);
    check("matmul", ok, || {
        format!(
            "x has {} floats, weight [{n}, {k}], out {} floats",
            x.len(),
            out.len()
        )
    })?;
    Ok(t)
}

pub fn rotary(x: &Tensor, positions: &[u32], n_heads: usize, rope: &Rope) -> Result<()> {
    let hd = rope.head_dim;
    let ok = hd.is_multiple_of(2) && x.len() == positions.len() * n_heads * hd;
    check("rotary", ok, || {
        format!(
            "x has {} floats for {} tokens x {n_heads} heads x {hd}",
            x.len(),
            positions.len()
        )
    })
}

/// K and V pools of the layer's shape and of one dtype (both are public fields).
fn kv_pools(cache: &KvLayer) -> Result<()> {
    let n = cache.num_slots() * cache.slot_width();
    let ok = cache.k.len() == n && cache.v.len() == n && cache.k.dtype() == cache.v.dtype();
    check("kv cache", ok, || {
        format!(
            "K {} {} and V {} {} values for {n}",
            cache.k.len(),
            cache.k.dtype().name(),
            cache.v.len(),
            cache.v.dtype().name()
        )
    })?;
    // An int8 pool's scales cover whole groups of one head (so whole slots are written).
    for pool in [&cache.k, &cache.v] {
        if let KvData::Int8 { scales, group, .. } = pool {
            let ok =
                *group > 0 && cache.head_dim.is_multiple_of(*group) && scales.len() * group == n;
            check("kv cache", ok, || {
                format!(
                    "int8 pool with {} scales per group of {group} for {n} values of heads of {}",
                    scales.len(),
                    cache.head_dim
                )
            })?;
        }
    }
    Ok(())
}

pub fn write_kv(cache: &KvLayer, k: &Tensor, v: &Tensor, slot_mapping: &[u32]) -> Result<()> {
    kv_pools(cache)?;
    let w = cache.slot_width();
    let ok = k.len() == slot_mapping.len() * w
        && v.len() == k.len()
        && slot_mapping
            .iter()
            .all(|&s| s == crate::PAD_SLOT || (s as usize) < cache.num_slots());
    check("write_kv", ok, || {
        format!(
            "{} slots, k {} floats, slot width {w}, pool {} slots",
            slot_mapping.len(),
            k.len(),
            cache.num_slots()
        )
    })
}

/// Also validates the batch layout against the cache.
pub fn attention(
    q: &Tensor,
    cache: &KvLayer,
    batch: &BatchLayout,
    n_heads: usize,
    out: &Tensor,
) -> Result<()> {
    batch.validate(cache)?;
    kv_pools(cache)?;
    let (hd, n_kv) = (cache.head_dim, cache.n_kv_heads);
    let t = batch.num_tokens();
    let ok = n_kv > 0
        && n_heads.is_multiple_of(n_kv)
        && q.len() == t * n_heads * hd
        && out.len() == q.len();
    check("attention", ok, || {
        format!(
            "q {} floats, {t} tokens, {n_heads} heads / {n_kv} kv heads of {hd}",
            q.len()
        )
    })
}

/// Every row index is a row of `x`.
pub fn gather_rows(x: &Tensor, width: usize, rows: &[u32], out: &Tensor) -> Result<()> {
    let have = x.len().checked_div(width).unwrap_or(0);
    let ok = width > 0
        && x.len() == have * width
        && out.len() == rows.len() * width
        && rows.iter().all(|&r| (r as usize) < have);
    check("gather_rows", ok, || {
        format!(
            "rows {rows:?} of {} floats in rows of {width}, out {} floats",
            x.len(),
            out.len()
        )
    })
}

pub fn pick_rows(x: &Tensor, width: usize, targets: &[u32], out: &Tensor) -> Result<()> {
    let rows = targets.len();
    let ok = width > 0
        && width <= crate::pick::MAX_PICK_WIDTH
        && x.len() == rows * width
        && out.len() == 2 * rows
        && targets
            .iter()
            .all(|&t| t == crate::NO_TARGET || (t as usize) < width);
    check("pick_rows", ok, || {
        format!(
            "{} targets (largest {:?}) over {} floats in rows of {width}, out {} floats",
            rows,
            targets.iter().filter(|&&t| t != crate::NO_TARGET).max(),
            x.len(),
            out.len()
        )
    })
}

pub fn top_rows(x: &Tensor, width: usize, rows: &[u32], k: usize, out: &Tensor) -> Result<()> {
    let ok = width > 0
        && width <= crate::pick::MAX_PICK_WIDTH
        && x.len().is_multiple_of(width)
        && rows.iter().all(|&r| (r as usize) < x.len() / width)
        && k <= crate::pick::MAX_RANKED.min(width)
        && out.len() == 2 * k * rows.len();
    check("top_rows", ok, || {
        format!(
            "rows {:?} (largest) of {} floats in rows of {width}, k {k} (at most {}), out {} floats",
            rows.iter().max(),
            x.len(),
            crate::pick::MAX_RANKED,
            out.len()
        )
    })
}

pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<()> {
    check("silu_mul", gate.len() == up.len(), || {
        format!("gate {} floats, up {}", gate.len(), up.len())
    })
}

/// Returns the number of rows.
pub fn rows_of(op: &'static str, len: usize, width: usize) -> Result<usize> {
    check(op, width > 0 && len.is_multiple_of(width), || {
        format!("{len} floats in rows of {width}")
    })?;
    Ok(len / width)
}
