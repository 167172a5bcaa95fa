//! In the steady state a CPU forward allocates only what it returns: its workspaces are reused. A counting global
//! allocator records the largest allocation made during one forward after warm-up; it must not exceed the returned
//! output (`[T, d]` f32), while the expert workspaces are several times larger than that.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use moe_backends::cpu::CpuBackend;
use moe_core::{
    Backend, MoeLayer, RouterArgs, RouterInput, WorkloadConfig, workload::random_swiglu_bank,
};

struct Counting;

static ON: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static BYTES: AtomicUsize = AtomicUsize::new(0);
static COUNT: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ON.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
            BYTES.fetch_add(layout.size(), Ordering::Relaxed);
            COUNT.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ON.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
            BYTES.fetch_add(new_size, Ordering::Relaxed);
            COUNT.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as for dealloc and alloc.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn steady_state_forward_allocates_only_its_result() {
    let (t, d, f, e, k) = (96, 64, 256, 8, 2);
    let router = moe_routers::builtin()
        .create("softmax-topk", &RouterArgs::new(d, e, k, 0))
        .unwrap_or_else(|err| panic!("{err}"));
    let bank = random_swiglu_bank(e, d, f, 0).unwrap_or_else(|err| panic!("{err}"));
    let layer = Arc::new(MoeLayer::new(router, bank).unwrap_or_else(|err| panic!("{err}")));
    let mut resident = CpuBackend::with_threads(2)
        .upload(layer)
        .unwrap_or_else(|err| panic!("{err}"));
    let w = WorkloadConfig {
        tokens: t,
        d_model: d,
        ..Default::default()
    }
    .generate()
    .unwrap_or_else(|err| panic!("{err}"));
    let input = RouterInput::new(w.hidden.view());
    for _ in 0..3 {
        resident
            .forward(&input)
            .unwrap_or_else(|err| panic!("{err}"));
    }
    ON.store(true, Ordering::SeqCst);
    let out = resident.forward(&input);
    ON.store(false, Ordering::SeqCst);
    let out = out.unwrap_or_else(|err| panic!("{err}"));
    let output_bytes = t * d * 4;
    let hidden_workspace = out.routing.n_slots() * f * 4;
    let (largest, bytes, count) = (
        LARGEST.load(Ordering::SeqCst),
        BYTES.load(Ordering::SeqCst),
        COUNT.load(Ordering::SeqCst),
    );
    println!(
        "steady-state forward: {count} allocations, {bytes} bytes, largest {largest} (output {output_bytes}, hidden workspace {hidden_workspace})"
    );
    assert!(
        hidden_workspace > 4 * output_bytes,
        "the test shape must make a workspace allocation visible"
    );
    assert!(
        largest <= output_bytes,
        "a forward allocated {largest} bytes at once; only the {output_bytes}-byte output may be that large"
    );
}
