//! Routing memory is O(T·E) once (issue 17, F-05): softmax-topk, Switch and noisy top-k hold one `[T, E]` buffer
//! (the logits) when the plan does not keep them (`E > KEEP_LOGITS_MAX_EXPERTS`), and softmax-topk and Switch one
//! more (the probabilities of the balance loss) when it does. (Expert choice holds two: the logits and the
//! probabilities every expert's column is chosen from.) Measured with a counting global allocator: the peak of live bytes during `route`,
//! above what was live before, in units of `T · E · 4` bytes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use moe_core::{KEEP_LOGITS_MAX_EXPERTS, RouterArgs, RouterInput, rng::SeqRng};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// One measurement at a time.
static ONE: Mutex<()> = Mutex::new(());

// SAFETY: forwards every call to the system allocator unchanged; only counts bytes.
#[allow(
    unsafe_code,
    reason = "a global allocator is an unsafe trait; this one forwards to System and only counts"
)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(live, Ordering::SeqCst);
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Peak bytes above the start while routing `t` tokens through registry router `name` with `e` experts, in units
/// of `T · E · 4`.
fn peak_units(name: &str, options: &[(&str, &str)], t: usize, e: usize) -> f64 {
    peak_units_in(name, options, t, e, false)
}

/// [`peak_units`] in eval or in training.
fn peak_units_in(name: &str, options: &[(&str, &str)], t: usize, e: usize, train: bool) -> f64 {
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    let d = 4;
    let mut args = RouterArgs::new(d, e, 2, 0);
    for (k, v) in options {
        args.set_option_str(k, v);
    }
    let router = moe_routers::builtin().create(name, &args).expect("router");
    let x = SeqRng::new(1, 2).normal_matrix(t, d, 1.0);
    let pad: Vec<bool> = (0..t).map(|i| i % 5 == 4).collect();
    let mode = if train {
        moe_core::Mode::Train { seed: 1 }
    } else {
        moe_core::Mode::Eval
    };
    let input = RouterInput::new(x.view())
        .with_padding(&pad)
        .with_mode(mode);
    let start = LIVE.load(Ordering::SeqCst);
    PEAK.store(start, Ordering::SeqCst);
    let plan = router.route(&input).expect("route");
    let peak = PEAK.load(Ordering::SeqCst) - start;
    drop(plan);
    peak as f64 / (t * e * 4) as f64
}

/// One test, so that no other test thread allocates while a peak is measured.
#[test]
fn routing_holds_one_t_by_e_buffer() {
    softmax_topk_holds_one_t_by_e_buffer();
    switch_holds_one_t_by_e_buffer();
    noisy_topk_holds_one_t_by_e_buffer();
}

fn softmax_topk_holds_one_t_by_e_buffer() {
    // Not kept: the logits only (the balance loss softmaxes them in place). Kept: logits + probabilities.
    let big = KEEP_LOGITS_MAX_EXPERTS * 2;
    for (preset, limit_one) in [("mixtral", 1.25), ("deepseek_v3", 1.25)] {
        let u = peak_units("softmax-topk", &[("preset", preset)], 128, big);
        println!("softmax-topk {preset} E = {big}: peak {u:.3} x T*E*4");
        assert!(u <= limit_one, "{preset}: {u}");
    }
    let u = peak_units("softmax-topk", &[], 512, 1024);
    println!("softmax-topk E = 1024 (logits kept): peak {u:.3} x T*E*4");
    assert!(u <= 2.25, "{u}");
}

fn switch_holds_one_t_by_e_buffer() {
    let big = KEEP_LOGITS_MAX_EXPERTS * 2;
    let u = peak_units("switch-top1", &[], 128, big);
    println!("switch-top1 E = {big}: peak {u:.3} x T*E*4");
    assert!(u <= 1.25, "{u}");
    let u = peak_units("switch-top1", &[], 512, 1024);
    println!("switch-top1 E = 1024 (logits kept): peak {u:.3} x T*E*4");
    assert!(u <= 2.25, "{u}");
}

fn noisy_topk_holds_one_t_by_e_buffer() {
    // The clean logits; the noise, noisy logits and f64 load estimates live for 64 tokens at a time.
    let big = KEEP_LOGITS_MAX_EXPERTS * 2;
    for train in [false, true] {
        let u = peak_units_in("noisy-topk", &[], 1024, big, train);
        println!("noisy-topk E = {big} train = {train}: peak {u:.3} x T*E*4");
        assert!(u <= 1.6, "{u}");
    }
}
