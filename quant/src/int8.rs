//! Symmetric int8 with one scale per output row ("per channel"): `x = q * scale`, `q` in
//! `-127..=127`. Round to nearest (`vellum_kernels::Weight::quantize`) and GPTQ (`gptq`) round
//! on this same grid, so both take the scale and the rounding rule from here.

/// A row's scale: its largest magnitude maps to ±127.
pub fn row_scale(row: &[f32]) -> f32 {
    row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0
}

/// What codes multiply by to get a scale's inverse (0 for an all-zero row's zero scale).
pub fn inverse(scale: f32) -> f32 {
    if scale > 0.0 {
        1.0 / scale
    } else {
        0.0
    }
}

/// The code nearest to `v` for a row whose scale's inverse is `inv`.
#[inline(always)]
pub fn code(v: f32, inv: f32) -> i8 {
    (v * inv).round().clamp(-127.0, 127.0) as i8
}
