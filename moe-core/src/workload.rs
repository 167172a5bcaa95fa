//! Synthetic workloads with structure: a seeded Gaussian mixture with Zipf-distributed cluster sizes, and Zipf
//! token ids, so that load imbalance and hash routing behave as they do on real text.

use ndarray::{Array2, Array3};

use crate::expert::{Activation, ExpertBank, SwiGluBank};

use crate::error::MoeError;
use crate::rng::SeqRng;

/// Parameters of the synthetic workload. Defaults: `T = 4096`, `d = 512`, 32 clusters, Zipf exponent 1.1, noise
/// 0.5, vocabulary 32 000, seed 0.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WorkloadConfig {
    /// Tokens `T`.
    pub tokens: usize,
    /// Hidden width `d`.
    pub d_model: usize,
    /// Number of Gaussian clusters.
    pub clusters: usize,
    /// Zipf exponent of cluster sizes and token ids (0 = uniform).
    pub skew: f64,
    /// Standard deviation of a token around its cluster centre (centres are `N(0, 1)`).
    pub noise: f32,
    /// Vocabulary size for token ids.
    pub vocab: usize,
    /// Seed.
    pub seed: u64,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            tokens: 4096,
            d_model: 512,
            clusters: 32,
            skew: 1.1,
            noise: 0.5,
            vocab: 32_000,
            seed: 0,
        }
    }
}

/// A generated workload.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Hidden states `[T, d]`.
    pub hidden: Array2<f32>,
    /// Token ids `[T]`, Zipf over the vocabulary.
    pub token_ids: Vec<u32>,
    /// The cluster of each token `[T]`.
    pub cluster: Vec<u32>,
}

/// Upper bound on `T · d` (2³² values, 16 GiB of f32) for a generated workload.
pub const MAX_WORKLOAD_VALUES: u128 = 1 << 32;

/// Cumulative Zipf distribution over `n` items with exponent `s`.
fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let mut cdf = Vec::with_capacity(n);
    let mut acc = 0.0;
    for i in 0..n {
        acc += 1.0 / ((i + 1) as f64).powf(s);
        cdf.push(acc);
    }
    for c in &mut cdf {
        *c /= acc;
    }
    cdf
}

fn sample(cdf: &[f64], u: f64) -> usize {
    cdf.partition_point(|&c| c <= u)
        .min(cdf.len().saturating_sub(1))
}

impl WorkloadConfig {
    /// Generates the workload.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for zero width, clusters or vocabulary, a negative skew or noise;
    /// [`MoeError::TooLarge`] past [`MAX_WORKLOAD_VALUES`].
    pub fn generate(&self) -> Result<Workload, MoeError> {
        if self.d_model == 0 {
            return Err(MoeError::config("d", 0, "must be >= 1"));
        }
        if self.clusters == 0 {
            return Err(MoeError::config("clusters", 0, "must be >= 1"));
        }
        if self.vocab == 0 || self.vocab > u32::MAX as usize {
            return Err(MoeError::config(
                "vocab",
                self.vocab,
                "must be between 1 and 2^32 - 1",
            ));
        }
        if !(self.skew.is_finite() && self.skew >= 0.0) {
            return Err(MoeError::config(
                "skew",
                self.skew,
                "must be finite and >= 0",
            ));
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(MoeError::config(
                "noise",
                self.noise,
                "must be finite and >= 0",
            ));
        }
        let values = self.tokens as u128 * self.d_model as u128;
        if values > MAX_WORKLOAD_VALUES {
            return Err(MoeError::TooLarge {
                what: "workload T * d".into(),
                size: values,
                limit: MAX_WORKLOAD_VALUES,
            });
        }
        let mut rng = SeqRng::new(self.seed, 0x5EED);
        let centres = rng.normal_matrix(self.clusters, self.d_model, 1.0);
        let cluster_cdf = zipf_cdf(self.clusters, self.skew);
        let vocab_cdf = zipf_cdf(self.vocab, self.skew);
        let mut hidden = Array2::zeros((self.tokens, self.d_model));
        let mut token_ids = Vec::with_capacity(self.tokens);
        let mut cluster = Vec::with_capacity(self.tokens);
        for (t, mut row) in hidden.outer_iter_mut().enumerate() {
            let c = sample(&cluster_cdf, rng.uniform());
            cluster.push(c as u32);
            token_ids.push(sample(&vocab_cdf, rng.uniform()) as u32);
            let centre = centres.row(c);
            for (j, x) in row.iter_mut().enumerate() {
                *x = centre[j] + self.noise * rng.normal() as f32;
            }
            debug_assert!(t < self.tokens);
        }
        Ok(Workload {
            hidden,
            token_ids,
            cluster,
        })
    }
}

/// A SwiGLU expert bank `gate_up [E, 2f, d]`, `down [E, d, f]` with `N(0, 1/fan_in)` weights, seeded: the experts
/// of synthetic layers (`moe compare`, `moe bench`).
///
/// # Errors
/// [`MoeError::InvalidConfig`] for a zero size; [`MoeError::TooLarge`] past 2³² weight values (16 GiB of f32).
pub fn random_swiglu_bank(
    n_experts: usize,
    d: usize,
    f: usize,
    seed: u64,
) -> Result<ExpertBank, MoeError> {
    if n_experts == 0 || d == 0 || f == 0 {
        return Err(MoeError::config(
            "E/d/f",
            format!("{n_experts}/{d}/{f}"),
            "must all be >= 1",
        ));
    }
    let values = 3 * n_experts as u128 * d as u128 * f as u128;
    if values > MAX_WORKLOAD_VALUES {
        return Err(MoeError::TooLarge {
            what: "expert weights 3 * E * d * f".into(),
            size: values,
            limit: MAX_WORKLOAD_VALUES,
        });
    }
    let mut rng = SeqRng::new(seed, 0xE4BE47);
    let (sd, sf) = (1.0 / (d as f32).sqrt(), 1.0 / (f as f32).sqrt());
    let gate_up = Array3::from_shape_simple_fn((n_experts, 2 * f, d), || rng.normal() as f32 * sd);
    let down = Array3::from_shape_simple_fn((n_experts, d, f), || rng.normal() as f32 * sf);
    Ok(ExpertBank::SwiGlu(SwiGluBank::new(
        gate_up,
        down,
        Activation::Silu,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_skewed() {
        let cfg = WorkloadConfig {
            tokens: 2000,
            d_model: 8,
            ..Default::default()
        };
        let a = cfg.generate().expect("valid config");
        let b = cfg.generate().expect("valid config");
        assert_eq!(a.hidden, b.hidden);
        assert_eq!(a.token_ids, b.token_ids);
        let mut sizes = vec![0usize; cfg.clusters];
        for &c in &a.cluster {
            sizes[c as usize] += 1;
        }
        // Zipf 1.1 over 32 clusters gives cluster 0 about 24 % of tokens and cluster 31 about 0.5 %.
        assert!(sizes[0] > 300 && sizes[0] < 700, "{sizes:?}");
        assert!(sizes[0] > 5 * sizes[31], "{sizes:?}");
    }

    #[test]
    fn bad_configs_are_errors() {
        assert!(
            WorkloadConfig {
                d_model: 0,
                ..Default::default()
            }
            .generate()
            .is_err()
        );
        assert!(
            WorkloadConfig {
                skew: f64::NAN,
                ..Default::default()
            }
            .generate()
            .is_err()
        );
        assert!(matches!(
            WorkloadConfig {
                tokens: usize::MAX / 2,
                ..Default::default()
            }
            .generate(),
            Err(MoeError::TooLarge { .. })
        ));
        let empty = WorkloadConfig {
            tokens: 0,
            ..Default::default()
        }
        .generate()
        .expect("T = 0 is valid");
        assert_eq!(empty.hidden.dim(), (0, 512));
    }
}
