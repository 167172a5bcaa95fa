//! Auxiliary losses, with the normalisation named in the type: the same "load-balancing loss" is `k` under uniform
//! routing in HF Mixtral and 1 in HF Switch, Megatron and DeepSpeed (ROUTERS.md §7).

use ndarray::ArrayView2;

/// Normalisation of a load-balancing loss `Σ f · P`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbNorm {
    /// HF Mixtral / Qwen / OLMoE: `E · Σ_e (count_e / T) · P_e`; `k` under uniform routing.
    HfTopK,
    /// HF Switch: `E² · mean_e(f_e · P_e)`, averaged over sequences; 1 under uniform routing.
    HfSwitch,
    /// Megatron: `E / (k · T²) · Σ_e (Σ_t p_e(t)) · count_e`; 1 under uniform routing.
    Megatron,
    /// DeepSpeed top-k: `E² / k · mean_e(P_e · count_e / T)`; 1 under uniform routing.
    DeepSpeed,
}

/// What an auxiliary loss measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "norm")]
pub enum AuxLossKind {
    /// Load-balancing loss with its normalisation.
    LoadBalance(LbNorm),
    /// Shazeer's importance loss `CV²(Σ_t G(x_t))`; 0 under uniform routing.
    Importance,
    /// Shazeer's smooth load loss `CV²(Σ_t P(x_t, e))`; 0 under uniform routing.
    SmoothLoad,
    /// Router z-loss `mean_t (logsumexp_e l_e(t))²`.
    RouterZ,
}

/// One auxiliary loss: its kind, its unweighted value, and the coefficient a trainer would multiply it by.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AuxLoss {
    /// What it measures and how it is normalised.
    pub kind: AuxLossKind,
    /// Unweighted value.
    pub value: f32,
    /// Coefficient (1e-2 Switch paper, 1e-3 HF, ...).
    pub coefficient: f32,
}

impl AuxLossKind {
    /// A short stable name: `lb_hf_topk`, `importance`, `z_loss`, ...
    pub fn name(&self) -> &'static str {
        match self {
            AuxLossKind::LoadBalance(LbNorm::HfTopK) => "lb_hf_topk",
            AuxLossKind::LoadBalance(LbNorm::HfSwitch) => "lb_hf_switch",
            AuxLossKind::LoadBalance(LbNorm::Megatron) => "lb_megatron",
            AuxLossKind::LoadBalance(LbNorm::DeepSpeed) => "lb_deepspeed",
            AuxLossKind::Importance => "importance",
            AuxLossKind::SmoothLoad => "smooth_load",
            AuxLossKind::RouterZ => "z_loss",
        }
    }
}

/// Load-balancing loss over one group of tokens.
///
/// `probs` is `[T, E]` (router probabilities of the real tokens), `counts[e]` the number of assignments of expert
/// `e` among those tokens (before capacity, as the references count), `k` the experts per token.
/// With `f_e = counts_e / T` and `P_e = mean_t probs[t, e]`:
/// - `HfTopK`: `E · Σ f_e P_e`,
/// - `HfSwitch`: `E² · mean_e(f_e P_e)` (= `E · Σ f_e P_e`; for several sequences use [`load_balance_grouped`]),
/// - `Megatron`: `E / (k · T²) · Σ_e (T · P_e) · counts_e` = `E / k · Σ f_e P_e`,
/// - `DeepSpeed`: `E² / k · mean_e(P_e · f_e)` = `E / k · Σ f_e P_e`.
///
/// Returns 0 for `T = 0`.
pub fn load_balance(probs: ArrayView2<'_, f32>, counts: &[usize], k: usize, norm: LbNorm) -> f32 {
    let (t, e) = probs.dim();
    if t == 0 || e == 0 {
        return 0.0;
    }
    let mut sum = 0.0f64;
    for j in 0..e {
        let p_mean: f64 = probs.column(j).iter().map(|&p| p as f64).sum::<f64>() / t as f64;
        let f = counts.get(j).copied().unwrap_or(0) as f64 / t as f64;
        sum += f * p_mean;
    }
    let e = e as f64;
    let k = k.max(1) as f64;
    let v = match norm {
        LbNorm::HfTopK | LbNorm::HfSwitch => e * sum,
        LbNorm::Megatron | LbNorm::DeepSpeed => e / k * sum,
    };
    v as f32
}

/// [`load_balance`] computed per sequence and averaged over sequences, as HF Switch does over batch rows.
/// `seq_lens` sum to `T`; `counts_per_seq[s][e]` are the counts inside sequence `s`.
pub fn load_balance_grouped(
    probs: ArrayView2<'_, f32>,
    seq_lens: &[usize],
    counts_per_seq: &[Vec<usize>],
    k: usize,
    norm: LbNorm,
) -> f32 {
    if seq_lens.is_empty() {
        return 0.0;
    }
    let mut start = 0usize;
    let mut acc = 0.0f64;
    for (s, &len) in seq_lens.iter().enumerate() {
        let p = probs.slice(ndarray::s![start..start + len, ..]);
        let empty = Vec::new();
        acc += load_balance(p, counts_per_seq.get(s).unwrap_or(&empty), k, norm) as f64;
        start += len;
    }
    (acc / seq_lens.len() as f64) as f32
}

/// `CV² = variance / mean²` (population variance, as Shazeer's reference), 0 for fewer than 2 values or a zero
/// mean.
pub fn cv_squared(values: &[f64]) -> f32 {
    let n = values.len();
    if n < 2 {
        return 0.0;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if mean == 0.0 {
        return 0.0;
    }
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
    (var / (mean * mean)) as f32
}

/// Router z-loss: `mean_t (logsumexp_e logits[t, e])²`; 0 for `T = 0`.
pub fn z_loss(logits: ArrayView2<'_, f32>) -> f32 {
    let t = logits.nrows();
    if t == 0 {
        return 0.0;
    }
    let mut acc = 0.0f64;
    for row in logits.outer_iter() {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let s: f64 = row.iter().map(|&l| (l as f64 - m).exp()).sum();
        let lse = m + s.ln();
        acc += lse * lse;
    }
    (acc / t as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// Uniform routing: every token gives every expert probability 1/E, and every expert gets exactly T·k/E
    /// assignments. Each normalisation must then give its documented uniform value (ROUTERS.md §7).
    #[test]
    fn uniform_values() {
        let (t, e, k) = (64usize, 8usize, 2usize);
        let probs = Array2::from_elem((t, e), 1.0 / e as f32);
        let counts = vec![t * k / e; e];
        let hf = load_balance(probs.view(), &counts, k, LbNorm::HfTopK);
        assert!((hf - k as f32).abs() < 1e-5, "hf {hf}");
        for norm in [LbNorm::Megatron, LbNorm::DeepSpeed] {
            let v = load_balance(probs.view(), &counts, k, norm);
            assert!((v - 1.0).abs() < 1e-5, "{norm:?} {v}");
        }
        let counts1 = vec![t / e; e];
        let sw = load_balance(probs.view(), &counts1, 1, LbNorm::HfSwitch);
        assert!((sw - 1.0).abs() < 1e-5);
        assert_eq!(cv_squared(&[3.0; 8]), 0.0);
    }

    #[test]
    fn z_loss_of_zero_logits_is_ln_e_squared() {
        // logsumexp of E zeros is ln E.
        let l = Array2::<f32>::zeros((5, 4));
        let z = z_loss(l.view());
        assert!((z - (4f32.ln()).powi(2)).abs() < 1e-6);
    }
}
