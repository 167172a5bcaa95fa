//! The WGSL modules and their compute pipelines. Each module is `common.wgsl` followed by one kernel family's
//! file(s), concatenated at compile time; each family binds its own parameter struct ([`super::params`]).

use std::collections::HashMap;

use ::wgpu as wg;

#[cfg(test)]
use super::params::{
    CombineParams, GemmParams, GroupParams, KernelParams, SharedGateParams, SwitchParams,
    TopKParams,
};

/// One WGSL module: its name, source, the parameter struct it binds and its entry points.
pub(super) struct Module {
    pub name: &'static str,
    pub source: &'static str,
    /// The WGSL name of its parameter struct (checked by the layout test).
    #[cfg(test)]
    pub params: &'static str,
    pub entries: &'static [&'static str],
}

/// Every module of the backend.
pub(super) const MODULES: &[Module] = &[
    Module {
        name: "gemm",
        source: concat!(include_str!("common.wgsl"), include_str!("gemm.wgsl")),
        #[cfg(test)]
        params: GemmParams::WGSL_NAME,
        entries: &["gemm_single", "gemm_dual"],
    },
    Module {
        name: "route_topk",
        source: concat!(
            include_str!("common.wgsl"),
            include_str!("route.wgsl"),
            include_str!("route_topk.wgsl")
        ),
        #[cfg(test)]
        params: TopKParams::WGSL_NAME,
        entries: &["route_topk"],
    },
    Module {
        name: "route_switch",
        source: concat!(
            include_str!("common.wgsl"),
            include_str!("route.wgsl"),
            include_str!("route_switch.wgsl")
        ),
        #[cfg(test)]
        params: SwitchParams::WGSL_NAME,
        entries: &["route_switch", "switch_capacity"],
    },
    Module {
        name: "group",
        source: concat!(include_str!("common.wgsl"), include_str!("group.wgsl")),
        #[cfg(test)]
        params: GroupParams::WGSL_NAME,
        entries: &["group_count", "group_scan", "group_scatter"],
    },
    Module {
        name: "shared_gate",
        source: concat!(
            include_str!("common.wgsl"),
            include_str!("shared_gate.wgsl")
        ),
        #[cfg(test)]
        params: SharedGateParams::WGSL_NAME,
        entries: &["shared_gate"],
    },
    Module {
        name: "combine",
        source: concat!(include_str!("common.wgsl"), include_str!("combine.wgsl")),
        #[cfg(test)]
        params: CombineParams::WGSL_NAME,
        entries: &["combine"],
    },
];

/// The compute pipelines of the kernels.
pub(super) struct Pipes {
    pub gemm_single: wg::ComputePipeline,
    pub gemm_dual: wg::ComputePipeline,
    pub route_topk: wg::ComputePipeline,
    pub route_switch: wg::ComputePipeline,
    pub switch_capacity: wg::ComputePipeline,
    pub group_count: wg::ComputePipeline,
    pub group_scan: wg::ComputePipeline,
    pub group_scatter: wg::ComputePipeline,
    pub shared_gate: wg::ComputePipeline,
    pub combine: wg::ComputePipeline,
}

/// Compiles every module and builds the pipelines of its entry points (errors surface in the caller's
/// validation scope).
pub(super) fn compile(device: &wg::Device) -> Pipes {
    let mut pipes: HashMap<&str, wg::ComputePipeline> = HashMap::new();
    for m in MODULES {
        let module = device.create_shader_module(wg::ShaderModuleDescriptor {
            label: Some(m.name),
            source: wg::ShaderSource::Wgsl(m.source.into()),
        });
        for &entry in m.entries {
            pipes.insert(entry, pipeline(device, &module, entry));
        }
    }
    let mut take = |entry: &str| match pipes.remove(entry) {
        Some(p) => p,
        // Only reachable if an entry point is renamed; the empty module then fails validation with its name.
        None => {
            let empty = device.create_shader_module(wg::ShaderModuleDescriptor {
                label: Some(entry),
                source: wg::ShaderSource::Wgsl("".into()),
            });
            pipeline(device, &empty, entry)
        }
    };
    Pipes {
        gemm_single: take("gemm_single"),
        gemm_dual: take("gemm_dual"),
        route_topk: take("route_topk"),
        route_switch: take("route_switch"),
        switch_capacity: take("switch_capacity"),
        group_count: take("group_count"),
        group_scan: take("group_scan"),
        group_scatter: take("group_scatter"),
        shared_gate: take("shared_gate"),
        combine: take("combine"),
    }
}

/// The compute pipeline of `entry` in `module`, its bind group layout derived from the bindings it uses.
fn pipeline(device: &wg::Device, module: &wg::ShaderModule, entry: &str) -> wg::ComputePipeline {
    device.create_compute_pipeline(&wg::ComputePipelineDescriptor {
        label: Some(entry),
        layout: None,
        module,
        entry_point: Some(entry),
        compilation_options: Default::default(),
        cache: None,
    })
}
