//! Experts: the [`Expert`] trait for custom experts, and [`ExpertBank`], the standard families a backend knows how to
//! run grouped. Weights are stored once, in the layout the checkpoint has; shapes are checked on construction.

use ndarray::{Array1, Array2, Array3, ArrayView2};

use crate::error::MoeError;
use crate::params::{Param, ParamMut};

/// A custom expert: maps `[n, d]` rows to `[n, d]` rows. Backends run custom experts on the host.
pub trait Expert: dyn_clone::DynClone + Send + Sync + std::fmt::Debug {
    /// Input and output width `d`.
    fn d_model(&self) -> usize;

    /// Applies the expert to `x` (`[n, d]`), returning `[n, d]`.
    ///
    /// # Errors
    /// Whatever the expert reports; backends wrap it in [`MoeError::Expert`].
    fn forward(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>, MoeError>;
}

dyn_clone::clone_trait_object!(Expert);

/// Elementwise activation functions of the expert families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x · sigmoid(x)` (SwiGLU's gate).
    #[default]
    Silu,
    /// `max(x, 0)`.
    Relu,
    /// Exact GELU, `x · Φ(x)` (erf form, PyTorch's default).
    Gelu,
    /// GELU, tanh approximation.
    GeluTanh,
}

/// SwiGLU experts with fused `gate_up` (transformers v5 layout): for expert `e`, `gu = x · gate_up[e]ᵀ` (`[n, 2f]`),
/// `h = act(gu[:, :f]) ⊙ gu[:, f:]` (first half gate, second half up), `y = h · down[e]ᵀ`.
#[derive(Debug, Clone, PartialEq)]
pub struct SwiGluBank {
    /// `[E, 2f, d]`.
    gate_up: Array3<f32>,
    /// `[E, d, f]`.
    down: Array3<f32>,
    /// Gate activation (SiLU for SwiGLU).
    act: Activation,
}

impl SwiGluBank {
    /// Fused gate and up projections `[E, 2f, d]` (first half gate, second half up).
    pub fn gate_up(&self) -> &Array3<f32> {
        &self.gate_up
    }

    /// Down projections `[E, d, f]`.
    pub fn down(&self) -> &Array3<f32> {
        &self.down
    }

    /// Gate activation (SiLU for SwiGLU).
    pub fn act(&self) -> Activation {
        self.act
    }

    /// Checks shapes: `gate_up [E, 2f, d]`, `down [E, d, f]`.
    ///
    /// # Errors
    /// [`MoeError::Shape`] naming the tensor.
    pub fn new(gate_up: Array3<f32>, down: Array3<f32>, act: Activation) -> Result<Self, MoeError> {
        let (e, f2, d) = gate_up.dim();
        if f2 == 0 || f2 % 2 != 0 || d == 0 || e == 0 {
            return Err(MoeError::shape(
                "experts.gate_up_proj",
                "[E >= 1, 2f (even, >= 2), d >= 1]",
                gate_up.shape(),
            ));
        }
        let f = f2 / 2;
        if down.dim() != (e, d, f) {
            return Err(MoeError::shape(
                "experts.down_proj",
                format!("[{e}, {d}, {f}]"),
                down.shape(),
            ));
        }
        Ok(SwiGluBank { gate_up, down, act })
    }
}

/// GPT-OSS experts: transposed layout, interleaved gate/up, clamped SwiGLU with biases.
/// `z = x · gate_up[e] + gate_up_bias[e]`; `g = min(z[:, 0::2], limit)`, `u = clamp(z[:, 1::2], -limit, limit)`;
/// `h = (u + 1) · g · sigmoid(alpha · g)`; `y = h · down[e] + down_bias[e]`.
#[derive(Debug, Clone, PartialEq)]
pub struct GptOssBank {
    /// `[E, d, 2f]` (applied as `x · W`).
    gate_up: Array3<f32>,
    /// `[E, 2f]`.
    gate_up_bias: Array2<f32>,
    /// `[E, f, d]` (applied as `h · W`).
    down: Array3<f32>,
    /// `[E, d]`.
    down_bias: Array2<f32>,
    /// Sigmoid slope (1.702).
    alpha: f32,
    /// Clamp limit (7.0 in the released models).
    limit: f32,
}

impl GptOssBank {
    /// Gate and up projections `[E, d, 2f]`, interleaved (even columns gate, odd up), applied as `x · W`.
    pub fn gate_up(&self) -> &Array3<f32> {
        &self.gate_up
    }

    /// Gate and up biases `[E, 2f]`, interleaved like [`GptOssBank::gate_up`].
    pub fn gate_up_bias(&self) -> &Array2<f32> {
        &self.gate_up_bias
    }

    /// Down projections `[E, f, d]`, applied as `h · W`.
    pub fn down(&self) -> &Array3<f32> {
        &self.down
    }

    /// Down biases `[E, d]`.
    pub fn down_bias(&self) -> &Array2<f32> {
        &self.down_bias
    }

    /// Sigmoid slope `alpha` (1.702).
    pub fn alpha(&self) -> f32 {
        self.alpha
    }

    /// Clamp limit (7.0 in the released models).
    pub fn limit(&self) -> f32 {
        self.limit
    }

    /// Checks shapes.
    ///
    /// # Errors
    /// [`MoeError::Shape`] naming the tensor; [`MoeError::InvalidConfig`] for a non-finite alpha or limit.
    pub fn new(
        gate_up: Array3<f32>,
        gate_up_bias: Array2<f32>,
        down: Array3<f32>,
        down_bias: Array2<f32>,
        alpha: f32,
        limit: f32,
    ) -> Result<Self, MoeError> {
        let (e, d, f2) = gate_up.dim();
        if f2 == 0 || f2 % 2 != 0 || d == 0 || e == 0 {
            return Err(MoeError::shape(
                "experts.gate_up_proj",
                "[E >= 1, d >= 1, 2f (even, >= 2)]",
                gate_up.shape(),
            ));
        }
        let f = f2 / 2;
        if gate_up_bias.dim() != (e, f2) {
            return Err(MoeError::shape(
                "experts.gate_up_proj_bias",
                format!("[{e}, {f2}]"),
                gate_up_bias.shape(),
            ));
        }
        if down.dim() != (e, f, d) {
            return Err(MoeError::shape(
                "experts.down_proj",
                format!("[{e}, {f}, {d}]"),
                down.shape(),
            ));
        }
        if down_bias.dim() != (e, d) {
            return Err(MoeError::shape(
                "experts.down_proj_bias",
                format!("[{e}, {d}]"),
                down_bias.shape(),
            ));
        }
        if !alpha.is_finite() || !limit.is_finite() || limit <= 0.0 {
            return Err(MoeError::config(
                "swiglu_limit/alpha",
                format!("{limit}/{alpha}"),
                "finite, limit > 0",
            ));
        }
        Ok(GptOssBank {
            gate_up,
            gate_up_bias,
            down,
            down_bias,
            alpha,
            limit,
        })
    }
}

/// Two-layer MLP experts (Switch, NLLB): `y = act(x · w1[e]ᵀ + b1[e]) · w2[e]ᵀ + b2[e]`.
#[derive(Debug, Clone, PartialEq)]
pub struct MlpBank {
    /// `[E, f, d]`.
    w1: Array3<f32>,
    /// Optional `[E, f]`.
    b1: Option<Array2<f32>>,
    /// `[E, d, f]`.
    w2: Array3<f32>,
    /// Optional `[E, d]`.
    b2: Option<Array2<f32>>,
    /// Hidden activation.
    act: Activation,
}

impl MlpBank {
    /// First projections `[E, f, d]`.
    pub fn w1(&self) -> &Array3<f32> {
        &self.w1
    }

    /// First biases `[E, f]`, if any.
    pub fn b1(&self) -> Option<&Array2<f32>> {
        self.b1.as_ref()
    }

    /// Second projections `[E, d, f]`.
    pub fn w2(&self) -> &Array3<f32> {
        &self.w2
    }

    /// Second biases `[E, d]`, if any.
    pub fn b2(&self) -> Option<&Array2<f32>> {
        self.b2.as_ref()
    }

    /// Hidden activation.
    pub fn act(&self) -> Activation {
        self.act
    }

    /// Checks shapes.
    ///
    /// # Errors
    /// [`MoeError::Shape`] naming the tensor.
    pub fn new(
        w1: Array3<f32>,
        b1: Option<Array2<f32>>,
        w2: Array3<f32>,
        b2: Option<Array2<f32>>,
        act: Activation,
    ) -> Result<Self, MoeError> {
        let (e, f, d) = w1.dim();
        if e == 0 || f == 0 || d == 0 {
            return Err(MoeError::shape(
                "experts.w1",
                "[E >= 1, f >= 1, d >= 1]",
                w1.shape(),
            ));
        }
        if w2.dim() != (e, d, f) {
            return Err(MoeError::shape(
                "experts.w2",
                format!("[{e}, {d}, {f}]"),
                w2.shape(),
            ));
        }
        if let Some(b) = &b1
            && b.dim() != (e, f)
        {
            return Err(MoeError::shape(
                "experts.b1",
                format!("[{e}, {f}]"),
                b.shape(),
            ));
        }
        if let Some(b) = &b2
            && b.dim() != (e, d)
        {
            return Err(MoeError::shape(
                "experts.b2",
                format!("[{e}, {d}]"),
                b.shape(),
            ));
        }
        Ok(MlpBank {
            w1,
            b1,
            w2,
            b2,
            act,
        })
    }
}

/// PEER singleton experts: `e_i(x) = act(u_i · x) · v_i`, `u, v` both `[N, d]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerBank {
    /// Down projections `[N, d]`.
    u: Array2<f32>,
    /// Up projections `[N, d]`.
    v: Array2<f32>,
    /// Activation (GELU in the paper).
    act: Activation,
}

impl PeerBank {
    /// Down projections `[N, d]`.
    pub fn u(&self) -> &Array2<f32> {
        &self.u
    }

    /// Up projections `[N, d]`.
    pub fn v(&self) -> &Array2<f32> {
        &self.v
    }

    /// Activation (GELU in the paper).
    pub fn act(&self) -> Activation {
        self.act
    }

    /// Checks shapes.
    ///
    /// # Errors
    /// [`MoeError::Shape`] naming the tensor.
    pub fn new(u: Array2<f32>, v: Array2<f32>, act: Activation) -> Result<Self, MoeError> {
        if u.nrows() == 0 || u.ncols() == 0 {
            return Err(MoeError::shape("peer.u", "[N >= 1, d >= 1]", u.shape()));
        }
        if v.dim() != u.dim() {
            return Err(MoeError::shape(
                "peer.v",
                format!("{:?}", u.shape()),
                v.shape(),
            ));
        }
        Ok(PeerBank { u, v, act })
    }
}

/// The experts of a layer. The standard families are run grouped by every backend; custom experts run on the host.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ExpertBank {
    /// SwiGLU with fused `gate_up` (Mixtral, Qwen, OLMoE, DeepSeek-V3, Granite, JetMoE).
    SwiGlu(SwiGluBank),
    /// GPT-OSS clamped, interleaved SwiGLU with biases.
    GptOss(GptOssBank),
    /// ReLU/GELU MLP with optional biases (Switch, NLLB).
    Mlp(MlpBank),
    /// PEER singleton experts.
    Peer(PeerBank),
    /// Any experts implementing [`Expert`].
    Custom(Vec<Box<dyn Expert>>),
    /// Experts living in an [`ExpertSource`](crate::store::ExpertSource) (host memory, a file on disk), at most
    /// [`StoredBank::slots`](crate::store::StoredBank::slots) resident at once (`crate::store`). Holds no
    /// weights: it lists no parameters and is not trained.
    Stored(crate::store::StoredBank),
    /// SwiGLU, GPT-OSS or MLP experts whose weights stay in a packed low-precision format (bf16, f16, int8, FP8
    /// blocks, MXFP4; `crate::quant`), decoded inside the backend's products. Inference only: it lists no
    /// parameters and is not trained.
    Packed(crate::quant::PackedBank),
}

/// `a`, moved into a fresh allocation whose data starts at a multiple of `bytes` (values and shape unchanged), or
/// `a` itself when it is already aligned and in standard layout.
fn aligned<D: ndarray::Dimension>(a: &mut ndarray::Array<f32, D>, bytes: usize) {
    if a.is_standard_layout() && (a.as_ptr() as usize).is_multiple_of(bytes) {
        return;
    }
    let pad = bytes / std::mem::size_of::<f32>();
    let mut v: Vec<f32> = Vec::with_capacity(a.len() + pad);
    let off = (bytes - v.as_ptr() as usize % bytes) % bytes / std::mem::size_of::<f32>();
    v.resize(off, 0.0);
    v.extend(a.iter().copied());
    let flat = ndarray::Array1::from_vec(v).slice_move(ndarray::s![off..]);
    if let Ok(moved) = flat.into_shape_with_order(a.raw_dim()) {
        *a = moved;
    }
}

impl ExpertBank {
    /// Moves every weight tensor whose data does not start at a multiple of `bytes` (a power of two, at least 4)
    /// into a fresh allocation that does; values and shapes are unchanged. SIMD kernels read aligned rows faster
    /// (the CPU backend aligns to 64 bytes at upload when it holds the only reference to the layer).
    pub fn align_weights(&mut self, bytes: usize) {
        if !bytes.is_power_of_two() || bytes < 4 {
            return;
        }
        match self {
            ExpertBank::SwiGlu(b) => {
                aligned(&mut b.gate_up, bytes);
                aligned(&mut b.down, bytes);
            }
            ExpertBank::GptOss(b) => {
                aligned(&mut b.gate_up, bytes);
                aligned(&mut b.down, bytes);
            }
            ExpertBank::Mlp(b) => {
                aligned(&mut b.w1, bytes);
                aligned(&mut b.w2, bytes);
            }
            ExpertBank::Peer(_)
            | ExpertBank::Custom(_)
            | ExpertBank::Stored(_)
            | ExpertBank::Packed(_) => {}
        }
    }

    /// Named views of the bank's tensors, in a fixed order: SwiGLU `gate_up` `[E, 2f, d]`, `down` `[E, d, f]`;
    /// GPT-OSS `gate_up` `[E, d, 2f]`, `gate_up_bias` `[E, 2f]`, `down` `[E, f, d]`, `down_bias` `[E, d]`; MLP
    /// `w1` `[E, f, d]`, `b1` `[E, f]`, `w2` `[E, d, f]`, `b2` `[E, d]` (biases where present); PEER `u`, `v`
    /// `[N, d]`. Custom experts, stored and packed banks list none.
    pub fn params(&self) -> Vec<Param<'_>> {
        match self {
            ExpertBank::SwiGlu(b) => vec![
                Param::new("gate_up", b.gate_up.view()),
                Param::new("down", b.down.view()),
            ],
            ExpertBank::GptOss(b) => vec![
                Param::new("gate_up", b.gate_up.view()),
                Param::new("gate_up_bias", b.gate_up_bias.view()),
                Param::new("down", b.down.view()),
                Param::new("down_bias", b.down_bias.view()),
            ],
            ExpertBank::Mlp(b) => {
                let mut v = vec![Param::new("w1", b.w1.view())];
                if let Some(b1) = &b.b1 {
                    v.push(Param::new("b1", b1.view()));
                }
                v.push(Param::new("w2", b.w2.view()));
                if let Some(b2) = &b.b2 {
                    v.push(Param::new("b2", b2.view()));
                }
                v
            }
            ExpertBank::Peer(b) => vec![Param::new("u", b.u.view()), Param::new("v", b.v.view())],
            ExpertBank::Custom(_) | ExpertBank::Stored(_) | ExpertBank::Packed(_) => Vec::new(),
        }
    }

    /// Mutable named views of the bank's tensors, as [`ExpertBank::params`].
    pub fn params_mut(&mut self) -> Vec<ParamMut<'_>> {
        match self {
            ExpertBank::SwiGlu(b) => vec![
                ParamMut::new("gate_up", b.gate_up.view_mut()),
                ParamMut::new("down", b.down.view_mut()),
            ],
            ExpertBank::GptOss(b) => vec![
                ParamMut::new("gate_up", b.gate_up.view_mut()),
                ParamMut::new("gate_up_bias", b.gate_up_bias.view_mut()),
                ParamMut::new("down", b.down.view_mut()),
                ParamMut::new("down_bias", b.down_bias.view_mut()),
            ],
            ExpertBank::Mlp(b) => {
                let mut v = vec![ParamMut::new("w1", b.w1.view_mut())];
                if let Some(b1) = &mut b.b1 {
                    v.push(ParamMut::new("b1", b1.view_mut()));
                }
                v.push(ParamMut::new("w2", b.w2.view_mut()));
                if let Some(b2) = &mut b.b2 {
                    v.push(ParamMut::new("b2", b2.view_mut()));
                }
                v
            }
            ExpertBank::Peer(b) => vec![
                ParamMut::new("u", b.u.view_mut()),
                ParamMut::new("v", b.v.view_mut()),
            ],
            ExpertBank::Custom(_) | ExpertBank::Stored(_) | ExpertBank::Packed(_) => Vec::new(),
        }
    }

    /// A bank of experts `experts` of this one, in that order (the experts one expert-parallel rank owns): expert
    /// `i` of the result is expert `experts[i]` of `self`, with the same weights, biases and activation.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] naming `experts` for an empty list, an id `>= E` or a repeated id;
    /// [`MoeError::Unsupported`] for a stored bank (its experts live in a source, not here).
    pub fn select(&self, experts: &[u32]) -> Result<ExpertBank, MoeError> {
        use ndarray::Axis;
        let n = self.n_experts();
        let mut seen = vec![false; n];
        for &e in experts {
            let e = e as usize;
            if e >= n || std::mem::replace(&mut seen[e], true) {
                return Err(MoeError::config(
                    "experts",
                    e,
                    format!("each id must be below E = {n} and listed once"),
                ));
            }
        }
        if experts.is_empty() {
            return Err(MoeError::config(
                "experts",
                "[]",
                "select at least one expert",
            ));
        }
        let ids: Vec<usize> = experts.iter().map(|&e| e as usize).collect();
        Ok(match self {
            ExpertBank::SwiGlu(b) => ExpertBank::SwiGlu(SwiGluBank::new(
                b.gate_up.select(Axis(0), &ids),
                b.down.select(Axis(0), &ids),
                b.act,
            )?),
            ExpertBank::GptOss(b) => ExpertBank::GptOss(GptOssBank::new(
                b.gate_up.select(Axis(0), &ids),
                b.gate_up_bias.select(Axis(0), &ids),
                b.down.select(Axis(0), &ids),
                b.down_bias.select(Axis(0), &ids),
                b.alpha,
                b.limit,
            )?),
            ExpertBank::Mlp(b) => ExpertBank::Mlp(MlpBank::new(
                b.w1.select(Axis(0), &ids),
                b.b1.as_ref().map(|a| a.select(Axis(0), &ids)),
                b.w2.select(Axis(0), &ids),
                b.b2.as_ref().map(|a| a.select(Axis(0), &ids)),
                b.act,
            )?),
            ExpertBank::Peer(b) => ExpertBank::Peer(PeerBank::new(
                b.u.select(Axis(0), &ids),
                b.v.select(Axis(0), &ids),
                b.act,
            )?),
            ExpertBank::Custom(v) => {
                ExpertBank::Custom(ids.iter().map(|&e| v[e].clone()).collect())
            }
            ExpertBank::Packed(b) => ExpertBank::Packed(b.select(&ids)?),
            ExpertBank::Stored(_) => {
                return Err(MoeError::Unsupported {
                    owner: "a stored bank".into(),
                    feature: "selecting experts (its experts live in a source)".into(),
                });
            }
        })
    }

    /// Number of experts `E`.
    pub fn n_experts(&self) -> usize {
        match self {
            ExpertBank::SwiGlu(b) => b.gate_up.dim().0,
            ExpertBank::GptOss(b) => b.gate_up.dim().0,
            ExpertBank::Mlp(b) => b.w1.dim().0,
            ExpertBank::Peer(b) => b.u.nrows(),
            ExpertBank::Custom(v) => v.len(),
            ExpertBank::Stored(s) => s.source().n_experts(),
            ExpertBank::Packed(b) => b.n_experts(),
        }
    }

    /// Model width `d` (0 for an empty custom bank).
    pub fn d_model(&self) -> usize {
        match self {
            ExpertBank::SwiGlu(b) => b.gate_up.dim().2,
            ExpertBank::GptOss(b) => b.gate_up.dim().1,
            ExpertBank::Mlp(b) => b.w1.dim().2,
            ExpertBank::Peer(b) => b.u.ncols(),
            ExpertBank::Custom(v) => v.first().map(|e| e.d_model()).unwrap_or(0),
            ExpertBank::Stored(s) => s.form().d_model(),
            ExpertBank::Packed(b) => b.d_model(),
        }
    }

    /// Hidden width `f` of one expert (1 for PEER singletons, 0 for custom experts).
    pub fn ffn(&self) -> usize {
        match self {
            ExpertBank::SwiGlu(b) => b.down.dim().2,
            ExpertBank::GptOss(b) => b.down.dim().1,
            ExpertBank::Mlp(b) => b.w1.dim().1,
            ExpertBank::Peer(_) => 1,
            ExpertBank::Custom(_) => 0,
            ExpertBank::Stored(s) => s.form().ffn(),
            ExpertBank::Packed(b) => b.ffn(),
        }
    }

    /// The family's name: `swiglu`, `gpt_oss`, `mlp`, `peer`, `custom`, `stored` (whose experts are of the
    /// family [`StoredBank::form`](crate::store::StoredBank::form) names), `packed` (whose family
    /// [`PackedBank::family`](crate::quant::PackedBank::family) names).
    pub fn kind(&self) -> &'static str {
        match self {
            ExpertBank::SwiGlu(_) => "swiglu",
            ExpertBank::GptOss(_) => "gpt_oss",
            ExpertBank::Mlp(_) => "mlp",
            ExpertBank::Peer(_) => "peer",
            ExpertBank::Custom(_) => "custom",
            ExpertBank::Stored(_) => "stored",
            ExpertBank::Packed(_) => "packed",
        }
    }

    /// Number of weight values one expert holds (for bytes-of-weights figures).
    pub fn params_per_expert(&self) -> usize {
        let (d, f) = (self.d_model(), self.ffn());
        match self {
            ExpertBank::SwiGlu(_) => 3 * d * f,
            ExpertBank::GptOss(_) => 3 * d * f + 2 * f + d,
            ExpertBank::Mlp(b) => {
                2 * d * f + b.b1.as_ref().map_or(0, |_| f) + b.b2.as_ref().map_or(0, |_| d)
            }
            ExpertBank::Peer(_) => 2 * d,
            ExpertBank::Custom(_) => 0,
            ExpertBank::Stored(s) => s.form().values_per_expert(),
            ExpertBank::Packed(b) => {
                let bias = |x: Option<&ndarray::Array2<f32>>| x.map_or(0, |a| a.ncols());
                let weights = match b.family() {
                    crate::quant::PackedFamily::Mlp { .. } => 2 * d * f,
                    _ => 3 * d * f,
                };
                weights + bias(b.up_bias()) + bias(b.down_bias())
            }
        }
    }
}

/// Shared experts that every token passes through (DeepSeek-V3, Qwen2-MoE), with an optional sigmoid gate:
/// `y_shared = sigmoid(x · gate) · bank_0(x)` (Qwen2-MoE) or `bank_0(x)` (DeepSeek-V3).
#[derive(Debug, Clone)]
pub struct SharedExperts {
    /// A bank of exactly one expert (several shared experts are one wider expert).
    bank: ExpertBank,
    /// Optional gate vector `[d]` (Qwen2-MoE `shared_expert_gate.weight` row).
    gate: Option<Array1<f32>>,
}

impl SharedExperts {
    /// The bank of one expert.
    pub fn bank(&self) -> &ExpertBank {
        &self.bank
    }

    /// The gate vector `[d]`, if any.
    pub fn gate(&self) -> Option<&Array1<f32>> {
        self.gate.as_ref()
    }

    /// Named views of its tensors: the bank's (see [`ExpertBank::params`]) and `gate` `[d]`.
    pub fn params(&self) -> Vec<Param<'_>> {
        let mut v = self.bank.params();
        if let Some(g) = &self.gate {
            v.push(Param::new("gate", g.view()));
        }
        v
    }

    /// Mutable named views of its tensors, as [`SharedExperts::params`].
    pub fn params_mut(&mut self) -> Vec<ParamMut<'_>> {
        let mut v = self.bank.params_mut();
        if let Some(g) = &mut self.gate {
            v.push(ParamMut::new("gate", g.view_mut()));
        }
        v
    }

    /// Moves the bank's weights to `bytes`-aligned allocations ([`ExpertBank::align_weights`]).
    pub fn align_weights(&mut self, bytes: usize) {
        self.bank.align_weights(bytes);
    }

    /// Checks that the bank holds one expert and the gate has width `d`.
    ///
    /// # Errors
    /// [`MoeError::Shape`] or [`MoeError::Mismatch`].
    pub fn new(bank: ExpertBank, gate: Option<Array1<f32>>) -> Result<Self, MoeError> {
        if bank.n_experts() != 1 {
            return Err(MoeError::mismatch(
                "shared experts",
                "bank experts",
                bank.n_experts(),
                "expected",
                1,
            ));
        }
        if let Some(g) = &gate
            && g.len() != bank.d_model()
        {
            return Err(MoeError::shape(
                "shared_expert_gate.weight",
                format!("[1, {}]", bank.d_model()),
                &[1, g.len()],
            ));
        }
        Ok(SharedExperts { bank, gate })
    }
}

#[cfg(test)]
mod align_tests {
    use super::*;
    use ndarray::{Array3, s};

    #[test]
    fn align_weights_keeps_values_and_shapes_and_aligns() {
        // A misaligned, non-standard start: a sliced view's owner.
        let base = Array3::from_shape_fn((3, 10, 7), |(a, b, c)| (a * 100 + b * 10 + c) as f32);
        let gate_up = base
            .slice(s![.., 1.., ..])
            .to_owned()
            .slice_move(s![.., ..8, ..]);
        let down = Array3::from_shape_fn((3, 7, 4), |(a, b, c)| (a + b + c) as f32 * 0.5);
        let bank = SwiGluBank::new(gate_up.clone(), down.clone(), Activation::Silu)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut e = ExpertBank::SwiGlu(bank);
        e.align_weights(64);
        let ExpertBank::SwiGlu(b) = &e else {
            panic!("bank kind changed")
        };
        assert_eq!(b.gate_up, gate_up);
        assert_eq!(b.down, down);
        assert!(b.gate_up.is_standard_layout() && b.down.is_standard_layout());
        assert_eq!(b.gate_up.as_ptr() as usize % 64, 0);
        assert_eq!(b.down.as_ptr() as usize % 64, 0);
    }
}
