//! GPTQ (Frantar et al., 2022, "Accurate Post-Training Quantization for Generative
//! Pre-trained Transformers"): quantizes a weight matrix one input column at a time and
//! spreads each column's rounding error over the columns not yet quantized, weighted by how
//! the layer's inputs correlate them, so that the layer's *outputs* on calibration inputs move
//! as little as the grid allows. Round to nearest minimises each weight's own error instead,
//! which is not what perplexity sees.
//!
//! With `H = Σ x xᵀ` over calibration inputs `x` (the Hessian of the output error), the
//! update needs the rows of `U`, the upper-triangular factor with `H⁻¹ = Uᵀ U`: after
//! quantizing column `j` of a row `w` to `q`, `w[j+1..] -= (w[j] - q) / U[j][j] · U[j][j+1..]`.
//! Columns go in order of decreasing `H[j][j]` ("act order"): the inputs with the most
//! energy are fixed first, while the most columns remain to absorb their error.

use crate::{int8, Int4Data, Int4Format, QuantError, ScaleSearch};

/// A layer input's GPTQ factor: `U` (see the module docs) in act order, ready to quantize any
/// weight matrix that reads this input.
pub struct GptqFactor {
    n: usize,
    /// `order[k]`: the input column quantized `k`-th.
    order: Vec<usize>,
    /// Row-major `n × n`, upper triangular, rows and columns in `order`.
    u: Vec<f32>,
}

impl GptqFactor {
    /// Factors the `n × n` Hessian `h` (row-major, symmetric) after adding `damp` times its
    /// mean diagonal to the diagonal, which keeps a Hessian from fewer calibration tokens
    /// than inputs invertible (GPTQ's default is 0.01). Inputs that were always zero get a
    /// unit diagonal: their weights never reach an output, and round to nearest.
    pub fn new(h: &[f64], n: usize, damp: f64) -> Result<GptqFactor, QuantError> {
        if h.len() != n * n {
            return Err(QuantError::Gptq(format!(
                "a Hessian of {} values for {n} inputs",
                h.len()
            )));
        }
        if h.iter().any(|v| !v.is_finite()) {
            return Err(QuantError::Gptq(
                "the Hessian is not finite (the calibration activations overflowed)".into(),
            ));
        }
        let diag = |i: usize| h[i * n + i];
        let mean = (0..n).map(diag).sum::<f64>() / n.max(1) as f64;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| diag(b).total_cmp(&diag(a)));
        // `a` is the damped Hessian in act order, *reversed*: its lower Cholesky factor `L`
        // gives `H = V Vᵀ` with `V = R L R` upper (R reverses), so `H⁻¹ = Uᵀ U` with
        // `U = V⁻¹ = R L⁻¹ R`. One factorisation and one triangular inverse.
        let at = |k: usize| order[n - 1 - k];
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..=i {
                let v = h[at(i) * n + at(j)];
                a[i * n + j] = if i == j {
                    if v > 0.0 {
                        v + damp * mean
                    } else {
                        1.0
                    }
                } else {
                    v
                };
            }
        }
        let m_t = inverse_cholesky_factor_fast(&mut a, n)?;
        // U[a][b] = L⁻¹[n-1-a][n-1-b] = (L⁻¹)ᵀ[n-1-b][n-1-a].
        let mut u = vec![0f32; n * n];
        for r in 0..n {
            for c in r..n {
                u[r * n + c] = m_t[(n - 1 - c) * n + (n - 1 - r)] as f32;
            }
        }
        Ok(GptqFactor { n, order, u })
    }

    /// Symmetric int8 with one scale per row (`amax / 127` of the row as given), GPTQ-rounded:
    /// the codes and the scales of a `[rows, n]` row-major weight.
    pub fn quantize_int8_per_row(&self, w: &[f32]) -> Result<(Vec<i8>, Vec<f32>), QuantError> {
        self.rows_of(w)?;
        let scales: Vec<f32> = w.chunks_exact(self.n).map(int8::row_scale).collect();
        let grid = Int8PerRow {
            inv: scales.iter().map(|&s| int8::inverse(s)).collect(),
            scales,
        };
        let codes = gptq_codes_fast(self, w, &grid);
        Ok((codes, grid.scales))
    }

    /// Planar int4 (`format`), GPTQ-rounded on the grid round to nearest picks: each group's
    /// scale (and offset) come from the weights as given, fixed before any column is rounded
    /// (columns go in act order, across groups).
    pub fn quantize_int4(&self, w: &[f32], format: Int4Format) -> Result<Int4Data, QuantError> {
        let rows = self.rows_of(w)?;
        let mut data = format.quantize(rows, self.n, w, ScaleSearch::RoundToNearest)?;
        let widen = |v: &[half::f16]| v.iter().map(|x| x.to_f32()).collect();
        let grid = Int4Grid {
            group: format.group,
            groups: format.groups(self.n)?,
            symmetric: format.symmetric,
            scales: widen(&data.scales),
            mins: widen(&data.mins),
        };
        let codes = gptq_codes_fast(self, w, &grid);
        data.packed = crate::int4::pack_codes(codes.iter().map(|&c| c as u8));
        Ok(data)
    }

    fn rows_of(&self, w: &[f32]) -> Result<usize, QuantError> {
        let n = self.n;
        if n == 0 || !w.len().is_multiple_of(n) {
            return Err(QuantError::Gptq(format!(
                "a weight of {} values for {n} inputs",
                w.len()
            )));
        }
        Ok(w.len() / n)
    }
}

/// Where GPTQ rounds each weight: the code for `v` at `(row, col)` and the value it stands for.
trait Grid: Sync {
    fn round(&self, row: usize, col: usize, v: f32) -> (i8, f32);
}

/// Symmetric int8, one scale per row.
struct Int8PerRow {
    scales: Vec<f32>,
    inv: Vec<f32>,
}

impl Grid for Int8PerRow {
    #[inline(always)]
    fn round(&self, row: usize, _col: usize, v: f32) -> (i8, f32) {
        let q = int8::code(v, self.inv[row]);
        (q, q as f32 * self.scales[row])
    }
}

/// Planar int4's rules (`crate::int4`), with the stored (f16) scales and offsets.
struct Int4Grid {
    group: usize,
    groups: usize,
    symmetric: bool,
    scales: Vec<f32>,
    mins: Vec<f32>,
}

impl Grid for Int4Grid {
    #[inline(always)]
    fn round(&self, row: usize, col: usize, v: f32) -> (i8, f32) {
        let g = row * self.groups + col / self.group;
        let d = self.scales[g];
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        if self.symmetric {
            let q = (v * id).round().clamp(-8.0, 7.0);
            ((q + 8.0) as i8, q * d)
        } else {
            let m = self.mins[g];
            let q = ((v - m) * id).round().clamp(0.0, 15.0);
            (q as i8, q * d + m)
        }
    }
}

/// GPTQ over a weight of whole rows: the code of every weight, in the weight's layout.
#[inline(always)]
fn gptq_codes<G: Grid>(f: &GptqFactor, w: &[f32], grid: &G) -> Vec<i8> {
    let n = f.n;
    let rows = w.len() / n;
    let mut codes = vec![0i8; w.len()];
    // Rows in tiles, so that each row of U is read once per tile, not once per row.
    const TILE: usize = 16;
    let mut tile = vec![0f32; TILE * n];
    for (r0, rows_w) in (0..rows).step_by(TILE).zip(w.chunks(TILE * n)) {
        let t = rows_w.len() / n;
        for (i, row) in rows_w.chunks_exact(n).enumerate() {
            for (k, &c) in f.order.iter().enumerate() {
                tile[i * n + k] = row[c];
            }
        }
        for k in 0..n {
            let urow = &f.u[k * n..(k + 1) * n];
            let col = f.order[k];
            for i in 0..t {
                let row = &mut tile[i * n..(i + 1) * n];
                let (code, value) = grid.round(r0 + i, col, row[k]);
                codes[(r0 + i) * n + col] = code;
                let err = (row[k] - value) / urow[k];
                for (x, &u) in row[k + 1..].iter_mut().zip(&urow[k + 1..]) {
                    *x -= err * u;
                }
            }
        }
    }
    codes
}

/// Whether the AVX2 + FMA builds of the long vector loops below can run: the baseline x86-64
/// build has only SSE2, and these loops are most of a calibration's time.
#[cfg(target_arch = "x86_64")]
fn wide_vectors() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// `inverse_cholesky_factor`, compiled for AVX2 + FMA where [`wide_vectors`] says so.
fn inverse_cholesky_factor_fast(a: &mut [f64], n: usize) -> Result<Vec<f64>, QuantError> {
    #[cfg(target_arch = "x86_64")]
    if wide_vectors() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide(a: &mut [f64], n: usize) -> Result<Vec<f64>, QuantError> {
            inverse_cholesky_factor(a, n)
        }
        // SAFETY: the CPU has the features `wide` is compiled for.
        return unsafe { wide(a, n) };
    }
    inverse_cholesky_factor(a, n)
}

/// `gptq_codes`, compiled for AVX2 + FMA where [`wide_vectors`] says so.
fn gptq_codes_fast<G: Grid>(f: &GptqFactor, w: &[f32], grid: &G) -> Vec<i8> {
    #[cfg(target_arch = "x86_64")]
    if wide_vectors() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide<G: Grid>(f: &GptqFactor, w: &[f32], grid: &G) -> Vec<i8> {
            gptq_codes(f, w, grid)
        }
        // SAFETY: the CPU has the features `wide` is compiled for.
        return unsafe { wide(f, w, grid) };
    }
    gptq_codes(f, w, grid)
}

/// `(L⁻¹)ᵀ` of the lower Cholesky factor `L` of `a` (see [`GptqFactor::new`]).
#[inline(always)]
fn inverse_cholesky_factor(a: &mut [f64], n: usize) -> Result<Vec<f64>, QuantError> {
    let l = cholesky_lower(a, n)?;
    Ok(lower_inverse_transposed(l, n))
}

/// The lower Cholesky factor of the symmetric positive definite `a` (lower triangle read),
/// in place.
#[inline(always)]
fn cholesky_lower(a: &mut [f64], n: usize) -> Result<&[f64], QuantError> {
    for i in 0..n {
        for j in 0..=i {
            let (above, row_i) = a.split_at_mut(i * n);
            let row_j = if j < i {
                &above[j * n..j * n + j]
            } else {
                &row_i[..j]
            };
            let s = row_i[j] - dot(&row_i[..j], row_j);
            if i == j {
                if s.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
                    return Err(QuantError::Gptq(format!(
                        "the damped Hessian is not positive definite (pivot {i}: {s:e}); \
                         raise the damping"
                    )));
                }
                row_i[i] = s.sqrt();
            } else {
                row_i[j] = s / above[j * n + j];
            }
        }
    }
    Ok(a)
}

/// `(L⁻¹)ᵀ` of a lower-triangular `l`, row-major: row `j` is column `j` of `L⁻¹`, found by
/// forward substitution in `L x = e_j` (contiguous dots over `L`'s rows).
#[inline(always)]
fn lower_inverse_transposed(l: &[f64], n: usize) -> Vec<f64> {
    let mut m_t = vec![0f64; n * n];
    for j in 0..n {
        let x = &mut m_t[j * n..(j + 1) * n];
        x[j] = 1.0 / l[j * n + j];
        for i in j + 1..n {
            let s = dot(&l[i * n + j..i * n + i], &x[j..i]);
            x[i] = -s / l[i * n + i];
        }
    }
    m_t
}

/// A dot product in sixteen independent sums: enough vector registers of them to hide the
/// latency of each multiply-add (one running sum would also pin the order of the additions
/// and keep the compiler from vectorising at all).
#[inline(always)]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    const LANES: usize = 16;
    let mut acc = [0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..LANES {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random stream in [-1, 1).
    fn noise(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// Inputs with correlated columns and a few loud ones, as a transformer's are.
    fn inputs(t: usize, n: usize) -> Vec<f32> {
        let mut r = noise(7);
        let mut x = vec![0f32; t * n];
        for row in x.chunks_exact_mut(n) {
            let shared = r();
            for (c, v) in row.iter_mut().enumerate() {
                let loud = if c % 17 == 3 { 8.0 } else { 1.0 };
                *v = loud * (0.6 * shared + r());
            }
        }
        x
    }

    fn hessian(x: &[f32], n: usize) -> Vec<f64> {
        let mut h = vec![0f64; n * n];
        for row in x.chunks_exact(n) {
            for i in 0..n {
                for j in 0..n {
                    h[i * n + j] += row[i] as f64 * row[j] as f64;
                }
            }
        }
        h
    }

    /// Σ over inputs and rows of (x · w_row − x · ŵ_row)².
    fn output_error(x: &[f32], w: &[f32], deq: &[f32], n: usize) -> f64 {
        let mut e = 0.0;
        for xr in x.chunks_exact(n) {
            for (wr, dr) in w.chunks_exact(n).zip(deq.chunks_exact(n)) {
                let d: f64 = xr
                    .iter()
                    .zip(wr.iter().zip(dr))
                    .map(|(&a, (&b, &c))| a as f64 * (b as f64 - c as f64))
                    .sum();
                e += d * d;
            }
        }
        e
    }

    #[test]
    fn the_inverse_factor_reproduces_the_inverse_hessian() {
        let n = 23;
        let h = hessian(&inputs(64, n), n);
        let f = GptqFactor::new(&h, n, 0.0).unwrap();
        // (Uᵀ U) in act order times H in act order is the identity.
        let p = &f.order;
        for i in 0..n {
            for j in 0..n {
                let mut v = 0f64;
                for k in 0..n {
                    let inv_ik: f64 = (0..n)
                        .map(|m| f.u[m * n + i] as f64 * f.u[m * n + k] as f64)
                        .sum();
                    v += inv_ik * h[p[k] * n + p[j]];
                }
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-3, "({i}, {j}): {v}");
            }
        }
        for r in 1..n {
            assert!(
                (0..r).all(|c| f.u[r * n + c] == 0.0),
                "row {r} is not upper"
            );
        }
    }

    #[test]
    fn gptq_moves_the_outputs_less_than_round_to_nearest() {
        let (t, n, rows) = (256, 48, 20);
        let x = inputs(t, n);
        let mut r = noise(11);
        // A coarse grid (one large value per row), where the error is worth spreading.
        let w: Vec<f32> = (0..rows * n)
            .map(|i| if i % n == 5 { 40.0 } else { r() })
            .collect();
        let f = GptqFactor::new(&hessian(&x, n), n, 0.01).unwrap();
        let (codes, scales) = f.quantize_int8_per_row(&w).unwrap();
        let gptq: Vec<f32> = codes
            .iter()
            .enumerate()
            .map(|(i, &q)| q as f32 * scales[i / n])
            .collect();
        let rtn: Vec<f32> = w
            .chunks_exact(n)
            .zip(&scales)
            .flat_map(|(row, &s)| row.iter().map(move |v| (v / s).round() * s))
            .collect();
        let (e_gptq, e_rtn) = (
            output_error(&x, &w, &gptq, n),
            output_error(&x, &w, &rtn, n),
        );
        assert!(
            e_gptq < 0.7 * e_rtn,
            "GPTQ {e_gptq:e} vs round to nearest {e_rtn:e}"
        );
        // The scales are round to nearest's, and every code stays on the int8 grid.
        assert!(codes.iter().all(|&q| q >= -127));
        for (row, &s) in w.chunks_exact(n).zip(&scales) {
            assert_eq!(s, row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0);
        }
    }

    #[test]
    fn gptq_int4_moves_the_outputs_less_than_round_to_nearest_on_the_same_grid() {
        let (t, n, rows) = (256, 128, 12);
        let x = inputs(t, n);
        let mut r = noise(5);
        let w: Vec<f32> = (0..rows * n).map(|_| r()).collect();
        let f = GptqFactor::new(&hessian(&x, n), n, 0.01).unwrap();
        for (group, symmetric) in [(64, true), (64, false), (128, true), (32, false)] {
            let format = Int4Format::new(group, symmetric).unwrap();
            let rtn = format
                .quantize(rows, n, &w, ScaleSearch::RoundToNearest)
                .unwrap();
            let gptq = f.quantize_int4(&w, format).unwrap();
            format.check(rows, n, &gptq).unwrap();
            assert_eq!((&gptq.scales, &gptq.mins), (&rtn.scales, &rtn.mins));
            let deq = |d: &Int4Data| -> Vec<f32> {
                let mut out = vec![0f32; rows * n];
                for (i, row) in out.chunks_exact_mut(n).enumerate() {
                    format.dequantize_row(d, n, i, row);
                }
                out
            };
            let (e_gptq, e_rtn) = (
                output_error(&x, &w, &deq(&gptq), n),
                output_error(&x, &w, &deq(&rtn), n),
            );
            assert!(
                e_gptq < 0.7 * e_rtn,
                "{}: GPTQ {e_gptq:e} vs round to nearest {e_rtn:e}",
                format.name()
            );
        }
    }

    #[test]
    fn dead_inputs_and_bad_shapes_are_handled() {
        let n = 6;
        let mut x = inputs(32, n);
        for row in x.chunks_exact_mut(n) {
            row[2] = 0.0;
        }
        let f = GptqFactor::new(&hessian(&x, n), n, 0.01).unwrap();
        let w: Vec<f32> = (0..2 * n).map(|i| i as f32 - 5.0).collect();
        let (codes, _) = f.quantize_int8_per_row(&w).unwrap();
        assert_eq!(codes.len(), 2 * n);
        assert!(f.quantize_int8_per_row(&w[..n + 1]).is_err());
        assert!(GptqFactor::new(&[1.0; 5], 2, 0.01).is_err());
        let mut nan = hessian(&x, n);
        nan[7] = f64::NAN;
        let err = GptqFactor::new(&nan, n, 0.01).err().unwrap().to_string();
        assert!(err.contains("not finite"), "{err}");
        // Without damping, a rank-deficient Hessian (more inputs than tokens) is refused.
        let few = inputs(3, n);
        let err = GptqFactor::new(&hessian(&few, n), n, 0.0)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("positive definite"), "{err}");
    }
}
