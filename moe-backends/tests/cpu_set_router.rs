//! The CPU backend through the device-parity case of `set_router` (`device_parity::set_router_keeps_the_bank`),
//! the body the wgpu and CUDA tests run too: one resident layer, several routers swapped in, each forward equal to
//! a fresh upload with that router; routers of another `E` or `d` refused. (The other shared cases expect a
//! device's native router paths, so only this one runs here.)

mod device_parity;

use moe_backends::Dtype;
use moe_backends::cpu::CpuBackend;
use moe_core::RouterPath;

use device_parity::Device;

#[test]
fn set_router_keeps_the_bank() {
    let b = CpuBackend::new();
    device_parity::set_router_keeps_the_bank(&Device {
        backend: &b,
        dtype: Dtype::F32,
        switch_path: RouterPath::Host,
    });
}
