//! AdamW, its learning-rate schedule and gradient clipping, written to match `torch.optim.AdamW` (single-tensor
//! path) and `torch.nn.utils.clip_grad_norm_` operation for operation, so a run and the PyTorch reference agree
//! step by step (`scripts/train_reference.py`).
//!
//! Per parameter `p` with gradient `g` (already multiplied by the clip factor), at step `t = 1, 2, …`:
//! ```text
//! p ← p · (1 − lr · λ)                       (decoupled weight decay; λ = 0 for norms)
//! m ← m + (1 − β₁) · (g − m)                 (torch's lerp)
//! v ← β₂ · v + (1 − β₂) · g²
//! p ← p − lr / (1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)
//! ```
//! Schedule (nanoGPT `get_lr`): `lr(s) = lr · (s + 1) / (warmup + 1)` for `s < warmup`, then a cosine from `lr` at
//! `warmup` to `min_lr` at step `total` (`lr_decay_iters = max_iters`). Clipping: `c = min(1, max_norm / (‖g‖₂ + 1e-6))` over all gradients.

use std::collections::BTreeMap;

use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD, Zip};

use moe_core::{Grad, MoeError, ParamMut};

use crate::config::OptimConfig;

/// The learning rate of step `step` (0-based) of a run of `total` steps.
pub fn lr_at(cfg: &OptimConfig, step: usize, total: usize) -> f32 {
    let (lr, min_lr) = (f64::from(cfg.lr), f64::from(cfg.min_lr));
    if step < cfg.warmup {
        return (lr * (step + 1) as f64 / (cfg.warmup + 1) as f64) as f32;
    }
    let span = total.saturating_sub(cfg.warmup);
    if span == 0 {
        return cfg.lr;
    }
    let ratio = ((step - cfg.warmup) as f64 / span as f64).min(1.0);
    let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
    (min_lr + coeff * (lr - min_lr)) as f32
}

/// The clip factor `min(1, max_norm / (norm + 1e-6))` of `torch.nn.utils.clip_grad_norm_`; 1 when `max_norm` is 0
/// (clipping off).
pub fn clip_factor(norm: f64, max_norm: f32) -> f32 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (f64::from(max_norm) / (norm + 1e-6)).min(1.0) as f32
}

/// `Σ g²` of one gradient, in f64 (dense or sparse rows: the untouched rows are 0).
pub fn sum_sq(g: &Grad) -> f64 {
    match &g.value {
        moe_core::GradValue::Dense(a) => a.iter().map(|&v| f64::from(v) * f64::from(v)).sum(),
        moe_core::GradValue::Rows { values, .. } => {
            values.iter().map(|&v| f64::from(v) * f64::from(v)).sum()
        }
    }
}

/// The first and second moments of one parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    /// `m`, the parameter's shape.
    pub m: ArrayD<f32>,
    /// `v`, the parameter's shape.
    pub v: ArrayD<f32>,
}

/// AdamW with moments kept by parameter name (the names of the model's parameters, MoE layers' included).
#[derive(Debug, Clone)]
pub struct AdamW {
    cfg: OptimConfig,
    /// Steps taken (`t` of the bias corrections).
    step: u64,
    /// The learning rate of the current step.
    lr: f32,
    moments: BTreeMap<String, Moments>,
}

impl AdamW {
    /// A fresh optimizer (no moments, step 0).
    pub fn new(cfg: OptimConfig) -> Self {
        AdamW {
            cfg,
            step: 0,
            lr: cfg.lr,
            moments: BTreeMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &OptimConfig {
        &self.cfg
    }

    /// Steps taken.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Starts a step with learning rate `lr`: every [`AdamW::update`] until the next call is part of it.
    pub fn begin_step(&mut self, lr: f32) {
        self.step += 1;
        self.lr = lr;
    }

    /// The moments, by parameter name (for checkpoints).
    pub fn moments(&self) -> &BTreeMap<String, Moments> {
        &self.moments
    }

    /// Restores a checkpoint's state: `steps` taken and the moments by name.
    pub fn restore(&mut self, steps: u64, moments: BTreeMap<String, Moments>) {
        self.step = steps;
        self.moments = moments;
    }

    /// One AdamW update of the parameter `name` with gradient `grad · scale` (`scale`: the clip factor); weight
    /// decay applies when `decay`.
    ///
    /// # Errors
    /// [`MoeError::Order`] before the first [`AdamW::begin_step`]; [`MoeError::Shape`] when the gradient or the
    /// kept moments do not have the parameter's shape.
    pub fn update(
        &mut self,
        name: &str,
        mut param: ArrayViewMutD<'_, f32>,
        grad: ArrayViewD<'_, f32>,
        scale: f32,
        decay: bool,
    ) -> Result<(), MoeError> {
        if self.step == 0 {
            return Err(MoeError::Order {
                call: "AdamW::update".into(),
                before: "AdamW::begin_step".into(),
            });
        }
        if grad.shape() != param.shape() {
            return Err(MoeError::shape(
                format!("gradient of {name}"),
                format!("{:?}", param.shape()),
                grad.shape(),
            ));
        }
        let mom = self
            .moments
            .entry(name.to_string())
            .or_insert_with(|| Moments {
                m: ArrayD::zeros(param.raw_dim()),
                v: ArrayD::zeros(param.raw_dim()),
            });
        if mom.m.shape() != param.shape() || mom.v.shape() != param.shape() {
            return Err(MoeError::shape(
                format!("AdamW moments of {name}"),
                format!("{:?}", param.shape()),
                mom.m.shape(),
            ));
        }
        let c = &self.cfg;
        let lr = f64::from(self.lr);
        let t = self.step as i32;
        let bc1 = 1.0 - f64::from(c.beta1).powi(t);
        let bc2_sqrt = (1.0 - f64::from(c.beta2).powi(t)).sqrt() as f32;
        let step_size = (lr / bc1) as f32;
        let decay_mul = if decay {
            (1.0 - lr * f64::from(c.weight_decay)) as f32
        } else {
            1.0
        };
        let (b1w, b2, b2w, eps) = (1.0 - c.beta1, c.beta2, 1.0 - c.beta2, c.eps);
        Zip::from(&mut param)
            .and(&grad)
            .and(&mut mom.m)
            .and(&mut mom.v)
            .for_each(|p, &g, m, v| {
                let g = if scale == 1.0 { g } else { g * scale };
                if decay {
                    *p *= decay_mul;
                }
                *m += b1w * (g - *m);
                *v = b2 * *v + b2w * g * g;
                let denom = v.sqrt() / bc2_sqrt + eps;
                *p -= step_size * (*m / denom);
            });
        Ok(())
    }

    /// [`AdamW::update`] for an MoE layer's parameter from
    /// [`DeviceLayer::apply_update`](moe_core::DeviceLayer::apply_update): a sparse gradient is scattered into zeros first (AdamW then moves
    /// every row, as torch's dense AdamW does). Parameters of 2 or more axes decay.
    ///
    /// # Errors
    /// As [`AdamW::update`].
    pub fn update_layer_param(
        &mut self,
        prefix: &str,
        param: &mut ParamMut<'_>,
        grad: &Grad,
        scale: f32,
    ) -> Result<(), MoeError> {
        let name = format!("{prefix}{}", param.name);
        let decay = param.value.ndim() >= 2;
        let dense;
        let g = match &grad.value {
            moe_core::GradValue::Dense(a) => a.view(),
            moe_core::GradValue::Rows { .. } => {
                dense = grad.to_dense()?;
                dense.view()
            }
        };
        self.update(&name, param.value.view_mut(), g, scale, decay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::ArrayD;

    #[test]
    fn schedule_warms_up_then_decays_to_min_lr() {
        let cfg = OptimConfig {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup: 10,
            ..OptimConfig::default()
        };
        assert!((lr_at(&cfg, 0, 100) - 1e-3 / 11.0).abs() < 1e-9);
        assert!((lr_at(&cfg, 10, 100) - 1e-3).abs() < 1e-9);
        assert!((lr_at(&cfg, 100, 100) - 1e-4).abs() < 1e-9);
        assert!(lr_at(&cfg, 99, 100) > 1e-4);
        let mid = lr_at(&cfg, 10 + 89 / 2, 100);
        assert!(mid < 1e-3 && mid > 1e-4);
    }

    #[test]
    fn clip_factor_is_torchs() {
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert!((clip_factor(4.0, 1.0) - 1.0 / (4.0 + 1e-6) as f32).abs() < 1e-9);
        assert_eq!(clip_factor(1e9, 0.0), 1.0);
    }

    /// One step by hand: with m = v = 0, the first step moves every weight by lr · sign(g) (up to ε), after
    /// decay.
    #[test]
    fn first_step_moves_by_lr_times_the_sign() {
        let cfg = OptimConfig::default();
        let mut opt = AdamW::new(cfg);
        let mut p = ArrayD::from_shape_vec(vec![2, 2], vec![1.0f32, -1.0, 0.5, 0.0]).expect("p");
        let g = ArrayD::from_shape_vec(vec![2, 2], vec![0.3f32, -2.0, 1e-3, 5.0]).expect("g");
        opt.begin_step(1e-2);
        opt.update("w", p.view_mut(), g.view(), 1.0, true)
            .expect("update");
        let want = [
            1.0 * (1.0 - 1e-3) - 1e-2,
            -(1.0 - 1e-3) + 1e-2,
            0.5 * (1.0 - 1e-3) - 1e-2,
            -1e-2,
        ];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn update_before_a_step_and_wrong_shapes_are_errors() {
        let mut opt = AdamW::new(OptimConfig::default());
        let mut p = ArrayD::<f32>::zeros(vec![3]);
        let g = ArrayD::<f32>::zeros(vec![3]);
        assert!(matches!(
            opt.update("w", p.view_mut(), g.view(), 1.0, false),
            Err(MoeError::Order { .. })
        ));
        opt.begin_step(1e-3);
        let g2 = ArrayD::<f32>::zeros(vec![4]);
        assert!(matches!(
            opt.update("w", p.view_mut(), g2.view(), 1.0, false),
            Err(MoeError::Shape { .. })
        ));
    }
}
