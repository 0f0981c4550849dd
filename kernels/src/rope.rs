//! Rotary position embedding frequencies, with the rope scalings of Hugging Face Llama.

/// `rope_scaling` of a Llama-family config.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (equivalently, frequencies).
    Linear {
        factor: f64,
    },
    /// Llama 3.x: low frequencies divided by `factor`, high ones kept, smooth in between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Rotary tables for one model: the inverse frequency of each rotated pair.
#[derive(Debug, Clone)]
pub struct Rope {
    pub head_dim: usize,
    /// `head_dim / 2` inverse frequencies, already scaled.
    pub inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Rope {
        let half = head_dim / 2;
        let mut inv_freq: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
            .collect();
        match *scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_ctx,
            } => {
                let low_freq_wavelen = old_ctx / low_freq_factor;
                let high_freq_wavelen = old_ctx / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_freq_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_freq_wavelen {
                        let smooth = (old_ctx / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        Rope {
            head_dim,
            // Hugging Face keeps inv_freq in f32 and multiplies positions in f32: do the same.
            inv_freq: inv_freq.iter().map(|&f| f as f32).collect(),
        }
    }

    /// `(cos, sin)` of every pair's angle at `position`, computed as the reference does
    /// (angle rounded to f32 first).
    #[inline]
    pub fn cos_sin(&self, position: u32, cos: &mut [f32], sin: &mut [f32]) {
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let angle = position as f32 * f;
            let (sa, ca) = (angle as f64).sin_cos();
            *c = ca as f32;
            *s = sa as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_divides_low_frequencies_and_keeps_high_ones() {
        let plain = Rope::new(64, 500000.0, &RopeScaling::None);
        let scaled = Rope::new(
            64,
            500000.0,
            &RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        );
        assert_eq!(plain.inv_freq[0], scaled.inv_freq[0]);
        let last = plain.inv_freq.len() - 1;
        assert!((plain.inv_freq[last] / 8.0 - scaled.inv_freq[last]).abs() < 1e-12);
    }

    #[test]
    fn linear_scaling_divides_every_frequency() {
        let plain = Rope::new(16, 10000.0, &RopeScaling::None);
        let scaled = Rope::new(16, 10000.0, &RopeScaling::Linear { factor: 2.0 });
        for (a, b) in plain.inv_freq.iter().zip(&scaled.inv_freq) {
            assert!((a / 2.0 - b).abs() <= a * 1e-6);
        }
    }
}
