//! Typed kernel parameters: one `#[repr(C)]` struct per kernel family, mirrored field by field (same names, same
//! order, same types) by the WGSL `struct` its module binds at `@group(0) @binding(0)`. A test parses every
//! module with naga and checks that the two layouts agree.

/// Bytes of one dispatch's parameter block in the uniform buffer (every struct fits; checked at compile time).
pub(super) const PARAMS_BYTES: usize = 64;

/// A WGSL scalar type a parameter field can have.
#[cfg(test)]
pub(super) trait WgslScalar {
    /// Its WGSL name.
    const WGSL: &'static str;
}

#[cfg(test)]
impl WgslScalar for u32 {
    const WGSL: &'static str = "u32";
}

#[cfg(test)]
impl WgslScalar for f32 {
    const WGSL: &'static str = "f32";
}

/// The parameters of one kernel family, as its WGSL struct lays them out.
pub(super) trait KernelParams: bytemuck::Pod {
    /// Name of the mirroring WGSL struct (for the layout test).
    #[cfg(test)]
    const WGSL_NAME: &'static str;
    /// `(name, byte offset, WGSL type)` of every field, in declaration order (for the layout test).
    #[cfg(test)]
    const FIELDS: &'static [(&'static str, usize, &'static str)];
}

/// Declares a parameter struct and its [`KernelParams`] description.
macro_rules! kernel_params {
    ($(#[doc = $doc:literal])* $name:ident { $($(#[doc = $fdoc:literal])* $field:ident: $ty:ty,)* }) => {
        $(#[doc = $doc])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
        pub(super) struct $name {
            $($(#[doc = $fdoc])* pub $field: $ty,)*
        }

        impl KernelParams for $name {
            #[cfg(test)]
            const WGSL_NAME: &'static str = stringify!($name);
            #[cfg(test)]
            const FIELDS: &'static [(&'static str, usize, &'static str)] =
                &[$((stringify!($field), std::mem::offset_of!($name, $field), <$ty as WgslScalar>::WGSL),)*];
        }

        const _: () = assert!(std::mem::size_of::<$name>() <= PARAMS_BYTES);
    };
}

kernel_params! {
    /// `gemm_single` / `gemm_dual` (gemm.wgsl): one grouped product over the canonical packed layout.
    GemmParams {
        /// Output columns `N`.
        n: u32,
        /// Reduction length `K` (the row length of `W_e`).
        k: u32,
        /// First expert of the bound weight chunk.
        e0: u32,
        /// One past its last expert.
        e1: u32,
        /// Elements per expert in the chunk.
        w_stride: u32,
        /// `E` of the row layout (`meta`).
        n_experts: u32,
        /// Activation code ([`crate::packed::act_code`]).
        act: u32,
        /// Epilogue of `gemm_dual`: [`crate::packed::MODE_GATED`] or [`crate::packed::MODE_GPT_OSS`].
        mode: u32,
        /// 1: add the bias.
        has_bias: u32,
        /// Bias elements per expert.
        b_stride: u32,
        /// 1: row `r` reads input row `idx[r]`.
        gather: u32,
        /// GPT-OSS's GLU slope.
        alpha: f32,
        /// GPT-OSS's clamp.
        limit: f32,
    }
}

kernel_params! {
    /// `route_topk` (route_topk.wgsl): token-choice top-k.
    TopKParams {
        /// Tokens `T`.
        t: u32,
        /// Experts `E`.
        e: u32,
        /// Choices per token `k`.
        k: u32,
        /// 0 softmax, 1 sigmoid, 2 sqrt-softplus.
        score: u32,
        /// 0 score then top-k, 1 top-k of the logits then softmax.
        order: u32,
        /// 1: renormalise the chosen weights.
        renormalize: u32,
        /// Factor on the weights.
        scaling: f32,
        /// Groups of group-limited selection (0: none).
        n_group: u32,
        /// Groups kept.
        topk_group: u32,
        /// 1: add the correction bias to the selection values.
        has_corr: u32,
    }
}

kernel_params! {
    /// `route_switch` and `switch_capacity` (route_switch.wgsl): Switch top-1 and its capacity.
    SwitchParams {
        /// Tokens `T`.
        t: u32,
        /// Experts `E`.
        e: u32,
        /// Assignments an expert keeps per capacity group.
        capacity: u32,
        /// 0: drop by position; 1: by probability.
        drop_by_weight: u32,
    }
}

kernel_params! {
    /// `group_count`, `group_scan`, `group_scatter` (group.wgsl): the counting sort by expert.
    GroupParams {
        /// Assignments `T · k`.
        n_assign: u32,
        /// Experts `E`.
        e: u32,
        /// Choices per token `k`.
        k: u32,
        /// Rows per product tile.
        bm: u32,
    }
}

kernel_params! {
    /// `shared_gate` (shared_gate.wgsl): the shared experts' sigmoid gate.
    SharedGateParams {
        /// Tokens `T`.
        t: u32,
        /// Width `d`.
        d: u32,
    }
}

kernel_params! {
    /// `combine` (combine.wgsl): the weighted sum per token.
    CombineParams {
        /// Tokens `T`.
        t: u32,
        /// Width `d`.
        d: u32,
        /// Entries per token (native routing); 0: per-token offsets (a host plan).
        fixed_k: u32,
        /// The routed part's scale.
        scale: f32,
        /// 0 no shared experts, 1 added, 2 added times their gate.
        shared_mode: u32,
        /// 1: add the output bias.
        has_bias: u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wgpu::pipelines::MODULES;
    use ::wgpu::naga;

    /// `(name, byte offset, type)` of each member of a struct.
    type Members = Vec<(String, usize, String)>;

    /// The members of WGSL struct `name` in `module`, and the struct's size.
    fn wgsl_struct(module: &naga::Module, name: &str) -> Option<(Members, usize)> {
        module.types.iter().find_map(|(_, ty)| match &ty.inner {
            naga::TypeInner::Struct { members, span } if ty.name.as_deref() == Some(name) => {
                let fields = members
                    .iter()
                    .map(|m| {
                        let ty = match module.types[m.ty].inner {
                            naga::TypeInner::Scalar(naga::Scalar {
                                kind: naga::ScalarKind::Uint,
                                width: 4,
                            }) => "u32",
                            naga::TypeInner::Scalar(naga::Scalar {
                                kind: naga::ScalarKind::Float,
                                width: 4,
                            }) => "f32",
                            _ => "other",
                        };
                        (
                            m.name.clone().unwrap_or_default(),
                            m.offset as usize,
                            ty.to_string(),
                        )
                    })
                    .collect();
                Some((fields, *span as usize))
            }
            _ => None,
        })
    }

    fn check<P: KernelParams>(module: &naga::Module, label: &str) {
        let (fields, size) = wgsl_struct(module, P::WGSL_NAME)
            .unwrap_or_else(|| panic!("module {label} declares no struct {}", P::WGSL_NAME));
        let rust: Members = P::FIELDS
            .iter()
            .map(|&(n, o, t)| (n.to_string(), o, t.to_string()))
            .collect();
        assert_eq!(fields, rust, "{label}: {} members", P::WGSL_NAME);
        assert_eq!(
            size,
            std::mem::size_of::<P>(),
            "{label}: size of {}",
            P::WGSL_NAME
        );
        // The struct is what the module binds at @group(0) @binding(0), as a uniform.
        let bound = module.global_variables.iter().find(|(_, g)| {
            g.binding
                .as_ref()
                .is_some_and(|b| b.group == 0 && b.binding == 0)
        });
        let (_, g) = bound.unwrap_or_else(|| panic!("{label}: nothing at binding 0"));
        assert_eq!(g.space, naga::AddressSpace::Uniform, "{label}");
        assert_eq!(
            module.types[g.ty].name.as_deref(),
            Some(P::WGSL_NAME),
            "{label}: binding 0"
        );
    }

    /// Every module parses and validates (no adapter needed), and binds the parameter struct whose Rust mirror
    /// has the same member names, offsets, types and size.
    #[test]
    fn wgsl_and_rust_parameter_layouts_agree() {
        for m in MODULES {
            let module = naga::front::wgsl::parse_str(m.source)
                .unwrap_or_else(|e| panic!("module {}: {}", m.name, e.emit_to_string(m.source)));
            naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::default(),
            )
            .validate(&module)
            .unwrap_or_else(|e| panic!("module {} does not validate: {e:?}", m.name));
            let entries: Vec<&str> = module
                .entry_points
                .iter()
                .map(|e| e.name.as_str())
                .collect();
            assert_eq!(entries, m.entries, "module {}: entry points", m.name);
            match m.params {
                "GemmParams" => check::<GemmParams>(&module, m.name),
                "TopKParams" => check::<TopKParams>(&module, m.name),
                "SwitchParams" => check::<SwitchParams>(&module, m.name),
                "GroupParams" => check::<GroupParams>(&module, m.name),
                "SharedGateParams" => check::<SharedGateParams>(&module, m.name),
                "CombineParams" => check::<CombineParams>(&module, m.name),
                other => panic!("module {}: unknown parameter struct {other}", m.name),
            }
        }
    }
}
