//! In the steady state the CPU backend reuses its workspaces. A counting global allocator records the allocations
//! of one forward after warm-up, for both kernel sets (the portable one on every machine, the AVX-512 one where the
//! CPU has it; the test prints which ran):
//! - with few rows per expert on the AVX-512 dot kernel (all ours): the largest allocation is no larger than the
//!   returned output (`[T, d]` f32), while the workspaces are several times larger;
//! - wherever the `gemm` crate runs (more rows per expert, or any row count on the portable kernels; gemm allocates
//!   its packing buffers inside every call, and its API has no way to reuse them): nothing as large as half of our
//!   hidden workspace is allocated, so no workspace was.
//!
//! The training step (`forward_train` then `backward`, after three warm-up steps) is checked the same way, on the
//! grouped path with a shared expert behind its gate and a `FixedPlan` router (whose backward is exact and only
//! allocates its `d_hidden`): the largest single allocation of the step must stay below half of the routed
//! hidden workspace (`rows · f` f32). The shapes make every returned tensor (output, `d_input`, `d_hidden`, every
//! gradient, the plan) and gemm's own per-call packing buffers smaller than that bound (asserted), while each
//! workspace the step reuses (routed `X`, `P`, `H`, `Y`, `dY`, shared `P`, `H`) is at least that large, so a
//! workspace allocated again in the steady state fails the test. With `backward_into` (the gradients handed back,
//! as a training loop does) the expert gradients are not allocated again either: the step's largest allocation is
//! then its `d_input` `[T, d]` (24,576 bytes here) where a fresh backward allocates 2 MB.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use moe_backends::cpu::{CpuBackend, CpuKernels};
use moe_core::testing::FixedPlan;
use moe_core::{
    Assignment, Backend, MoeLayer, RouterArgs, RouterInput, SharedExperts, WorkloadConfig,
    workload::random_swiglu_bank,
};

struct Counting;

static ON: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static BYTES: AtomicUsize = AtomicUsize::new(0);
static COUNT: AtomicUsize = AtomicUsize::new(0);
/// The counters are global: the tests of this file take turns.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

// SAFETY: forwards to the system allocator unchanged; only counts.
#[allow(
    unsafe_code,
    reason = "a global allocator is an unsafe trait; this one forwards to System and only counts"
)]
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

/// One steady-state check; counters are global, so the shapes run one after another in one test.
fn check(t: usize, d: usize, f: usize, e: usize, k: usize, few_rows: bool, kernels: CpuKernels) {
    LARGEST.store(0, Ordering::SeqCst);
    BYTES.store(0, Ordering::SeqCst);
    COUNT.store(0, Ordering::SeqCst);
    let router = moe_routers::builtin()
        .create("softmax-topk", &RouterArgs::new(d, e, k, 0))
        .unwrap_or_else(|err| panic!("{err}"));
    let bank = random_swiglu_bank(e, d, f, 0).unwrap_or_else(|err| panic!("{err}"));
    let layer = Arc::new(MoeLayer::new(router, bank).unwrap_or_else(|err| panic!("{err}")));
    let backend = CpuBackend::with_threads(2).with_kernels(kernels);
    // Only the dot kernel is all ours; gemm allocates its own packing buffers.
    let only_ours = few_rows && backend.uses_dot_kernel();
    let mut resident = backend.upload(layer).unwrap_or_else(|err| panic!("{err}"));
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
        "steady-state forward ({kernels:?}, dot kernel: {only_ours}): {count} allocations, {bytes} bytes, largest {largest} (output {output_bytes}, hidden workspace {hidden_workspace})"
    );
    assert!(
        hidden_workspace > 4 * output_bytes,
        "the test shape must make a workspace allocation visible"
    );
    if only_ours {
        assert!(
            largest <= output_bytes,
            "a forward allocated {largest} bytes at once; only the {output_bytes}-byte output may be that large"
        );
    } else {
        assert!(
            largest < hidden_workspace / 2,
            "a forward allocated {largest} bytes at once: a workspace ({hidden_workspace} bytes) was reallocated"
        );
    }
}

#[test]
fn steady_state_forward_allocates_only_its_result() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    // Groups of about 24 rows (dot kernel where the CPU has AVX-512), about 200 (transposed gemm) and 600 (gemm),
    // on the portable kernels (every CPU) and on the automatic choice (AVX-512 where present).
    for kernels in [CpuKernels::Portable, CpuKernels::Auto] {
        check(96, 64, 256, 8, 2, true, kernels);
        check(200, 64, 2048, 2, 2, false, kernels);
        check(600, 64, 2048, 1, 1, false, kernels);
    }
}

/// One steady-state training step; `t · k` routed rows, `e` experts, a shared expert of width `fs` with a gate.
fn check_training(
    t: usize,
    d: usize,
    f: usize,
    fs: usize,
    e: usize,
    k: usize,
    kernels: CpuKernels,
) {
    LARGEST.store(0, Ordering::SeqCst);
    BYTES.store(0, Ordering::SeqCst);
    COUNT.store(0, Ordering::SeqCst);
    let kept = (0..t)
        .flat_map(|tok| {
            (0..k).map(move |r| Assignment {
                token: tok as u32,
                expert: ((tok + r) % e) as u32,
                weight: 0.5,
                rank: r as u16,
            })
        })
        .collect();
    let router = FixedPlan {
        n_experts: e,
        d_model: d,
        kept,
    };
    let bank = random_swiglu_bank(e, d, f, 0).unwrap_or_else(|err| panic!("{err}"));
    let shared_bank = random_swiglu_bank(1, d, fs, 1).unwrap_or_else(|err| panic!("{err}"));
    let shared = SharedExperts::new(shared_bank, Some(ndarray::Array1::from_elem(d, 0.1)))
        .unwrap_or_else(|err| panic!("{err}"));
    let layer = MoeLayer::new(Box::new(router), bank)
        .and_then(|l| l.with_shared(shared))
        .unwrap_or_else(|err| panic!("{err}"));
    let mut resident = CpuBackend::with_threads(2)
        .with_kernels(kernels)
        .upload(Arc::new(layer))
        .unwrap_or_else(|err| panic!("{err}"));
    let w = WorkloadConfig {
        tokens: t,
        d_model: d,
        ..Default::default()
    }
    .generate()
    .unwrap_or_else(|err| panic!("{err}"));
    let input = RouterInput::new(w.hidden.view());
    let d_output = ndarray::Array2::<f32>::ones((t, d));
    for _ in 0..3 {
        resident
            .forward_train(&input)
            .and_then(|_| resident.backward(d_output.view(), &[]))
            .unwrap_or_else(|err| panic!("{err}"));
    }
    ON.store(true, Ordering::SeqCst);
    let out = resident.forward_train(&input);
    let grads = resident.backward(d_output.view(), &[]);
    ON.store(false, Ordering::SeqCst);
    let (out, grads) = (
        out.unwrap_or_else(|err| panic!("{err}")),
        grads.unwrap_or_else(|err| panic!("{err}")),
    );
    let hidden_workspace = out.routing.n_slots() * f * 4;
    let bound = hidden_workspace / 2;
    let returned = grads
        .params
        .iter()
        .map(|g| g.shape().iter().product::<usize>() * 4)
        .chain([t * d * 4])
        .max()
        .unwrap_or(0);
    let (largest, bytes, count) = (
        LARGEST.load(Ordering::SeqCst),
        BYTES.load(Ordering::SeqCst),
        COUNT.load(Ordering::SeqCst),
    );
    println!(
        "steady-state training step ({kernels:?}): {count} allocations, {bytes} bytes, largest {largest} (largest returned tensor {returned}, hidden workspace {hidden_workspace}, shared pre-activations {})",
        t * 2 * fs * 4
    );
    assert!(
        returned < bound && t * 2 * fs * 4 >= bound,
        "the test shape must make a workspace allocation visible"
    );
    assert!(
        largest < bound,
        "a training step allocated {largest} bytes at once: a workspace (>= {bound} bytes) was reallocated"
    );
}

#[test]
fn steady_state_training_step_allocates_only_its_results() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    for kernels in [CpuKernels::Portable, CpuKernels::Auto] {
        // Groups of 1000 rows (gemm) and of 600 rows.
        check_training(1000, 32, 1024, 512, 2, 2, kernels);
        check_training(600, 64, 2048, 1024, 1, 1, kernels);
    }
}

/// With `backward_into` (the gradients handed back each step, as a training loop does), a steady training step does
/// not allocate the expert gradients again: its largest allocation stays below the smallest expert weight gradient,
/// which the same step with `backward` (fresh gradients) does allocate (asserted, so the check can fail).
#[test]
fn steady_state_backward_into_reuses_the_gradients() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let (t, d, f, e, k) = (96, 64, 1024, 4, 2);
    let kept = (0..t)
        .flat_map(|tok| {
            (0..k).map(move |r| Assignment {
                token: tok as u32,
                expert: ((tok + r) % e) as u32,
                weight: 0.5,
                rank: r as u16,
            })
        })
        .collect();
    let router = FixedPlan {
        n_experts: e,
        d_model: d,
        kept,
    };
    let bank = random_swiglu_bank(e, d, f, 0).unwrap_or_else(|err| panic!("{err}"));
    let layer = MoeLayer::new(Box::new(router), bank).unwrap_or_else(|err| panic!("{err}"));
    let mut resident = CpuBackend::with_threads(2)
        .upload(Arc::new(layer))
        .unwrap_or_else(|err| panic!("{err}"));
    let w = WorkloadConfig {
        tokens: t,
        d_model: d,
        ..Default::default()
    }
    .generate()
    .unwrap_or_else(|err| panic!("{err}"));
    let input = RouterInput::new(w.hidden.view());
    let d_output = ndarray::Array2::<f32>::ones((t, d));
    let mut grads = moe_core::LayerGrads::empty();
    let mut step = |reuse: bool, grads: &mut moe_core::LayerGrads| {
        LARGEST.store(0, Ordering::SeqCst);
        ON.store(true, Ordering::SeqCst);
        let r = resident.forward_train(&input).and_then(|_| {
            if reuse {
                resident.backward_into(d_output.view(), &[], grads)
            } else {
                resident.backward(d_output.view(), &[]).map(|g| *grads = g)
            }
        });
        ON.store(false, Ordering::SeqCst);
        r.unwrap_or_else(|err| panic!("{err}"));
        LARGEST.load(Ordering::SeqCst)
    };
    for _ in 0..3 {
        step(true, &mut grads);
    }
    let reused = step(true, &mut grads);
    // The smallest expert weight gradient: down [E, d, f].
    let expert_grad = e * d * f * 4;
    let mut fresh_grads = moe_core::LayerGrads::empty();
    let fresh = step(false, &mut fresh_grads);
    println!(
        "training step: largest allocation {reused} bytes with backward_into, {fresh} with backward (expert gradient {expert_grad})"
    );
    assert!(
        fresh >= expert_grad,
        "the fresh backward must allocate the gradients ({fresh} bytes)"
    );
    assert!(
        reused < expert_grad,
        "backward_into allocated {reused} bytes at once: an expert gradient was allocated again"
    );
    assert_eq!(grads, fresh_grads);
}
