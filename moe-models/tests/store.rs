//! The disk tier of the expert store: every layout and dtype loads each expert bit for bit as the presets build the
//! resident bank; broken files (a missing expert, inconsistent shapes, a foreign dtype, no experts under the prefix,
//! a file truncated after it was opened) are clear errors; loads from two threads agree.

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use moe_core::MoeError;
use moe_core::store::{ExpertForm, ExpertSource, Tier};
use moe_models::store::{DiskDtype, DiskSource, Layout, read_gate, write_expert_checkpoint};
use moe_models::{Checkpoint, Family, LoadError, MoeConfig, build_layer};
use safetensors::tensor::{Dtype, TensorView};

/// The system allocator, counting the allocations of the threads that ask it to.
struct Counting;

thread_local! {
    /// Allocations of this thread while counting; `None` when not counting.
    static ALLOCS: Cell<Option<usize>> = const { Cell::new(None) };
}

// SAFETY: every call is forwarded to `System`; the counter is a thread-local `Cell` with a const initialiser,
// which does not allocate.
#[allow(
    unsafe_code,
    reason = "a global allocator is an unsafe trait; this one forwards every call to System"
)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get().map(|n| n + 1)));
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

const E: usize = 5;
const D: usize = 8;
const F: usize = 6;
const SEED: u64 = 19;

/// A fresh directory for one test, removed when dropped.
fn dir(test: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("moe-store-{test}-"))
        .tempdir()
        .expect("create the test directory")
}

/// The family a preset reads `layout` with, and the block prefix used in the tests.
fn family(layout: Layout) -> (Family, &'static str) {
    match layout {
        Layout::PerExpert => (Family::Qwen2Moe, "model.layers.0.mlp."),
        Layout::Mixtral | Layout::Fused => (Family::Mixtral, "model.layers.0.block_sparse_moe."),
        Layout::GptOss => (Family::GptOss, "model.layers.0.mlp."),
    }
}

/// Writes a checkpoint of `layout` and `dtype` with the router gate; returns its path and prefix.
fn write(dir: &Path, layout: Layout, dtype: DiskDtype) -> (PathBuf, &'static str) {
    let (_, prefix) = family(layout);
    let path = dir.join(format!("{}-{}.safetensors", layout.name(), dtype.name()));
    write_expert_checkpoint(&path, prefix, layout, E, D, F, dtype, SEED, true)
        .expect("write the checkpoint");
    (path, prefix)
}

/// Each expert's tensors (in `ExpertBank::params` order) of the bank the family's preset builds from the file,
/// reading everything into memory.
fn reference(path: &Path, layout: Layout) -> Vec<Vec<Vec<f32>>> {
    let (fam, prefix) = family(layout);
    let ckpt = Checkpoint::open(path).expect("open the checkpoint");
    let layer =
        build_layer(&MoeConfig::new(fam, E, 2), &ckpt.weights(prefix)).expect("build the layer");
    let params = layer.experts().params();
    (0..E)
        .map(|e| {
            params
                .iter()
                .map(|p| {
                    let all = p.value.as_slice().expect("contiguous");
                    let n = all.len() / E;
                    all[e * n..(e + 1) * n].to_vec()
                })
                .collect()
        })
        .collect()
}

/// Loads expert `e` of `src` into fresh buffers.
fn load(src: &dyn ExpertSource, e: usize) -> Result<Vec<Vec<f32>>, MoeError> {
    let mut out: Vec<Vec<f32>> = src
        .form()
        .tensors()
        .iter()
        .map(|(_, n)| vec![f32::NAN; *n])
        .collect();
    let mut dst: Vec<&mut [f32]> = out.iter_mut().map(Vec::as_mut_slice).collect();
    src.load(e, &mut dst)?;
    Ok(out)
}

/// Bit patterns, so that equality is bit for bit (and NaN-safe).
fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|t| t.iter().map(|x| x.to_bits()).collect())
        .collect()
}

const LAYOUTS: [Layout; 4] = [
    Layout::PerExpert,
    Layout::Mixtral,
    Layout::Fused,
    Layout::GptOss,
];
const DTYPES: [DiskDtype; 3] = [DiskDtype::F32, DiskDtype::Bf16, DiskDtype::F16];

#[test]
fn every_layout_and_dtype_loads_each_expert_as_the_resident_bank() {
    let tmp = dir("layouts");
    let dir = tmp.path();
    for layout in LAYOUTS {
        for dtype in DTYPES {
            let (path, prefix) = write(dir, layout, dtype);
            let src = DiskSource::open(&path, prefix).expect("open the disk source");
            let what = format!("{} {}", layout.name(), dtype.name());
            assert_eq!(src.layout(), layout, "{what}");
            assert_eq!(src.dtype(), dtype, "{what}");
            assert_eq!(src.n_experts(), E, "{what}");
            assert_eq!(src.tier(), Tier::Disk);
            // SwiGLU: gate, up [f, d] and down [d, f]; GPT-OSS adds the biases 2f and d.
            let values = match layout {
                Layout::GptOss => 3 * F * D + 2 * F + D,
                _ => 3 * F * D,
            };
            assert_eq!(
                src.stored_bytes_per_expert(),
                (values * dtype.bytes()) as u64,
                "{what}"
            );
            let form = match layout {
                Layout::GptOss => ExpertForm::GptOss {
                    d: D,
                    f: F,
                    alpha: 1.702,
                    limit: 7.0,
                },
                _ => ExpertForm::SwiGlu {
                    d: D,
                    f: F,
                    act: moe_core::Activation::Silu,
                },
            };
            assert_eq!(src.form(), &form, "{what}");
            let want = reference(&path, layout);
            // In reverse, so that the loads are not in file order.
            for e in (0..E).rev() {
                let got = load(&src, e).expect("load");
                assert_eq!(bits(&got), bits(&want[e]), "{what} expert {e}");
            }
        }
    }
}

#[test]
fn the_swiglu_layouts_hold_the_same_experts_for_one_seed() {
    let tmp = dir("same");
    let dir = tmp.path();
    let loaded: Vec<Vec<Vec<Vec<u32>>>> = [Layout::PerExpert, Layout::Mixtral, Layout::Fused]
        .into_iter()
        .map(|layout| {
            let (path, prefix) = write(dir, layout, DiskDtype::Bf16);
            let src = DiskSource::open(&path, prefix).expect("open");
            (0..E)
                .map(|e| bits(&load(&src, e).expect("load")))
                .collect()
        })
        .collect();
    assert_eq!(loaded[0], loaded[1]);
    assert_eq!(loaded[0], loaded[2]);
    // Different experts differ (the seed reaches every expert).
    assert_ne!(loaded[0][0], loaded[0][1]);
}

#[test]
fn read_gate_reads_the_router_gate() {
    let tmp = dir("gate");
    let dir = tmp.path();
    for layout in [Layout::PerExpert, Layout::GptOss] {
        let (path, prefix) = write(dir, layout, DiskDtype::Bf16);
        let gate = read_gate(&path, prefix).expect("read the gate");
        assert_eq!(gate.dim(), (E, D));
        let name = if layout == Layout::GptOss {
            "router.weight"
        } else {
            "gate.weight"
        };
        let want = Checkpoint::open(&path)
            .expect("open")
            .tensor(&format!("{prefix}{name}"))
            .expect("tensor");
        assert_eq!(gate.as_slice().expect("contiguous"), want.data.as_slice());
        assert!(gate.iter().all(|v| v.abs() <= 1.0 / (D as f32).sqrt()));
    }
    // A file without a gate: the error names both names tried.
    let path = dir.join("nogate.safetensors");
    write_expert_checkpoint(
        &path,
        "m.",
        Layout::Fused,
        E,
        D,
        F,
        DiskDtype::F32,
        SEED,
        false,
    )
    .expect("write");
    let msg = read_gate(&path, "m.").expect_err("no gate").to_string();
    assert!(
        msg.contains("m.gate.weight") && msg.contains("m.router.weight"),
        "{msg}"
    );
}

/// Rewrites the safetensors file `src` as `dst`, keeping the tensors `edit` returns `Some` for, with the returned
/// dtype, shape and bytes.
fn rewrite(
    src: &Path,
    dst: &Path,
    edit: impl Fn(&str, Dtype, &[usize], &[u8]) -> Option<(Dtype, Vec<usize>, Vec<u8>)>,
) {
    let bytes = std::fs::read(src).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
    let kept: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .iter()
        .filter_map(|(name, t)| {
            let (dt, shape, data) = edit(name, t.dtype(), t.shape(), t.data())?;
            Some((name.to_string(), dt, shape, data))
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = kept
        .iter()
        .map(|(n, dt, shape, data)| {
            (
                n.clone(),
                TensorView::new(*dt, shape.clone(), data).expect("view"),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, dst).expect("serialize");
}

/// The same tensor, unchanged.
fn same(_: &str, dt: Dtype, shape: &[usize], data: &[u8]) -> Option<(Dtype, Vec<usize>, Vec<u8>)> {
    Some((dt, shape.to_vec(), data.to_vec()))
}

#[test]
fn a_checkpoint_missing_an_expert_is_refused_naming_the_tensor() {
    let tmp = dir("missing");
    let dir = tmp.path();
    let (path, prefix) = write(dir, Layout::PerExpert, DiskDtype::Bf16);
    // One tensor of a middle expert.
    let broken = dir.join("broken.safetensors");
    rewrite(&path, &broken, |n, dt, s, d| {
        if n.ends_with("experts.3.up_proj.weight") {
            None
        } else {
            same(n, dt, s, d)
        }
    });
    let err = DiskSource::open(&broken, prefix).expect_err("missing up_proj");
    assert!(matches!(err, LoadError::MissingTensor { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("model.layers.0.mlp.experts.3.up_proj.weight"),
        "{msg}"
    );
    assert!(msg.contains("broken.safetensors"), "{msg}");
    // The whole last expert: the gate's E rows still ask for it.
    let broken = dir.join("broken-last.safetensors");
    rewrite(&path, &broken, |n, dt, s, d| {
        if n.contains(&format!("experts.{}.", E - 1)) {
            None
        } else {
            same(n, dt, s, d)
        }
    });
    let msg = DiskSource::open(&broken, prefix)
        .expect_err("missing the last expert")
        .to_string();
    assert!(
        msg.contains(&format!("experts.{}.gate_proj.weight", E - 1)),
        "{msg}"
    );
    // A fused file whose down_proj is missing.
    let (fused, fprefix) = write(dir, Layout::Fused, DiskDtype::F32);
    let broken = dir.join("broken-fused.safetensors");
    rewrite(&fused, &broken, |n, dt, s, d| {
        if n.ends_with("experts.down_proj") {
            None
        } else {
            same(n, dt, s, d)
        }
    });
    let msg = DiskSource::open(&broken, fprefix)
        .expect_err("missing down_proj")
        .to_string();
    assert!(msg.contains("block_sparse_moe.experts.down_proj"), "{msg}");
}

#[test]
fn inconsistent_shapes_are_refused_naming_the_tensor_and_both_shapes() {
    let tmp = dir("shapes");
    let dir = tmp.path();
    let (path, prefix) = write(dir, Layout::Mixtral, DiskDtype::F32);
    // Expert 2's down projection stored as [f, d] instead of [d, f] (the same bytes).
    let broken = dir.join("broken.safetensors");
    rewrite(&path, &broken, |n, dt, s, d| {
        if n.ends_with("experts.2.w2.weight") {
            Some((dt, vec![F, D], d.to_vec()))
        } else {
            same(n, dt, s, d)
        }
    });
    let err = DiskSource::open(&broken, prefix).expect_err("transposed w2");
    assert!(matches!(err, LoadError::Shape { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("experts.2.w2.weight"), "{msg}");
    assert!(
        msg.contains(&format!("[{D}, {F}]")) && msg.contains(&format!("[{F}, {D}]")),
        "{msg}"
    );
    // A fused down_proj of the wrong width.
    let (fused, fprefix) = write(dir, Layout::Fused, DiskDtype::F32);
    let broken = dir.join("broken-fused.safetensors");
    rewrite(&fused, &broken, |n, dt, s, d| {
        if n.ends_with("experts.down_proj") {
            Some((dt, vec![E, D, F - 1], d[..E * D * (F - 1) * 4].to_vec()))
        } else {
            same(n, dt, s, d)
        }
    });
    let msg = DiskSource::open(&broken, fprefix)
        .expect_err("narrow down_proj")
        .to_string();
    assert!(msg.contains("experts.down_proj"), "{msg}");
    assert!(
        msg.contains(&format!("[{E}, {D}, {F}]"))
            && msg.contains(&format!("[{E}, {D}, {}]", F - 1)),
        "{msg}"
    );
    // A router gate with fewer rows than the file has experts.
    let (path, prefix) = write(dir, Layout::PerExpert, DiskDtype::F32);
    let broken = dir.join("short-gate.safetensors");
    rewrite(&path, &broken, |n, dt, s, d| {
        if n.ends_with("mlp.gate.weight") {
            Some((dt, vec![E - 1, D], d[..(E - 1) * D * 4].to_vec()))
        } else {
            same(n, dt, s, d)
        }
    });
    let msg = DiskSource::open(&broken, prefix)
        .expect_err("short gate")
        .to_string();
    assert!(
        msg.contains("mlp.gate.weight")
            && msg.contains(&format!("experts.{}.gate_proj.weight", E - 1)),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("[{E}, {D}]")) && msg.contains(&format!("[{}, {D}]", E - 1)),
        "{msg}"
    );
    // A router gate of another width.
    let broken = dir.join("wide-gate.safetensors");
    rewrite(&path, &broken, |n, dt, s, d| {
        if n.ends_with("mlp.gate.weight") {
            Some((dt, vec![E, D - 1], d[..E * (D - 1) * 4].to_vec()))
        } else {
            same(n, dt, s, d)
        }
    });
    let msg = DiskSource::open(&broken, prefix)
        .expect_err("narrow gate")
        .to_string();
    assert!(
        msg.contains("mlp.gate.weight") && msg.contains(&format!("[{E}, {}]", D - 1)),
        "{msg}"
    );
}

#[test]
fn foreign_and_mixed_dtypes_are_refused() {
    let tmp = dir("dtype");
    let dir = tmp.path();
    let (path, prefix) = write(dir, Layout::PerExpert, DiskDtype::F32);
    // I32 values in expert 0's gate projection (F32 and I32 have the same width).
    let broken = dir.join("i32.safetensors");
    rewrite(&path, &broken, |n, dt, s, d| {
        if n.ends_with("experts.0.gate_proj.weight") {
            Some((Dtype::I32, s.to_vec(), d.to_vec()))
        } else {
            same(n, dt, s, d)
        }
    });
    let err = DiskSource::open(&broken, prefix).expect_err("I32");
    assert!(matches!(err, LoadError::Dtype { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("I32") && msg.contains("experts.0.gate_proj.weight"),
        "{msg}"
    );
    // One expert in F16 in an F32 file (half the bytes).
    let broken = dir.join("mixed.safetensors");
    rewrite(&path, &broken, |n, dt, s, d| {
        if n.ends_with("experts.4.down_proj.weight") {
            Some((Dtype::F16, s.to_vec(), d[..d.len() / 2].to_vec()))
        } else {
            same(n, dt, s, d)
        }
    });
    let msg = DiskSource::open(&broken, prefix)
        .expect_err("mixed")
        .to_string();
    assert!(
        msg.contains("experts.4.down_proj.weight") && msg.contains("F16") && msg.contains("F32"),
        "{msg}"
    );
}

#[test]
fn a_prefix_without_experts_lists_what_was_expected() {
    let tmp = dir("prefix");
    let dir = tmp.path();
    let (path, _) = write(dir, Layout::PerExpert, DiskDtype::Bf16);
    let err = DiskSource::open(&path, "model.layers.7.mlp.").expect_err("no experts there");
    assert!(matches!(err, LoadError::MissingTensor { .. }), "{err:?}");
    let msg = err.to_string();
    for name in [
        "model.layers.7.mlp.experts.{e}.gate_proj.weight",
        "model.layers.7.mlp.experts.{e}.w1.weight",
        "model.layers.7.mlp.experts.gate_up_proj",
    ] {
        assert!(msg.contains(name), "{msg}");
    }
}

#[test]
fn bad_files_are_refused() {
    let tmp = dir("files");
    let dir = tmp.path();
    let msg = DiskSource::open(dir, "m.")
        .expect_err("a directory")
        .to_string();
    assert!(msg.contains("directory"), "{msg}");
    let short = dir.join("short.safetensors");
    std::fs::write(&short, [1u8, 0, 0]).expect("write");
    assert!(matches!(
        DiskSource::open(&short, "m."),
        Err(LoadError::Truncated { .. })
    ));
    let past = dir.join("past.safetensors");
    std::fs::write(&past, [200u8, 0, 0, 0, 0, 0, 0, 0, b'{', b'}']).expect("write");
    assert!(matches!(
        DiskSource::open(&past, "m."),
        Err(LoadError::HeaderPastEnd { .. })
    ));
    // A header over the cap is refused before it is read.
    let huge = dir.join("huge.safetensors");
    std::fs::write(
        &huge,
        (moe_models::store::MAX_HEADER_BYTES + 1).to_le_bytes(),
    )
    .expect("write");
    assert!(matches!(
        DiskSource::open(&huge, "m."),
        Err(LoadError::TooLarge { .. })
    ));
    // A file whose data is longer than its header says.
    let (path, prefix) = write(dir, Layout::Fused, DiskDtype::F32);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes.extend_from_slice(&[0; 4]);
    let long = dir.join("long.safetensors");
    std::fs::write(&long, &bytes).expect("write");
    assert!(matches!(
        DiskSource::open(&long, prefix),
        Err(LoadError::Truncated { .. })
    ));
}

#[test]
fn a_file_truncated_after_open_is_a_load_error_naming_the_expert() {
    let tmp = dir("truncated");
    let dir = tmp.path();
    for layout in [Layout::PerExpert, Layout::Fused] {
        let (path, prefix) = write(dir, layout, DiskDtype::Bf16);
        let src = DiskSource::open(&path, prefix).expect("open");
        let len = std::fs::metadata(&path).expect("stat").len();
        // Cut the last expert's down projection in half.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open for writing")
            .set_len(len - (D * F) as u64)
            .expect("truncate");
        assert!(
            load(&src, 0).is_ok(),
            "{}: expert 0 is whole",
            layout.name()
        );
        let err = load(&src, E - 1).expect_err("the last expert is cut");
        let MoeError::Expert { expert, reason } = &err else {
            panic!("expected an expert error, got {err:?}");
        };
        assert_eq!(*expert, E - 1);
        assert!(
            reason.contains("down_proj") && reason.contains(&path.display().to_string()),
            "{reason}"
        );
        assert!(reason.contains("truncated"), "{reason}");
    }
}

#[test]
fn bad_load_requests_are_errors() {
    let tmp = dir("requests");
    let dir = tmp.path();
    let (path, prefix) = write(dir, Layout::PerExpert, DiskDtype::Bf16);
    let src = DiskSource::open(&path, prefix).expect("open");
    assert!(matches!(
        load(&src, E),
        Err(MoeError::Expert { expert: E, .. })
    ));
    assert!(matches!(
        load(&src, usize::MAX),
        Err(MoeError::Expert { .. })
    ));
    let mut short = vec![0f32; 3];
    let mut down = vec![0f32; D * F];
    let err = src
        .load(0, &mut [&mut short, &mut down])
        .expect_err("a short gate_up");
    assert!(matches!(err, MoeError::Shape { .. }), "{err:?}");
    let err = src.load(0, &mut [&mut down]).expect_err("one slice");
    assert!(matches!(err, MoeError::Shape { .. }), "{err:?}");
}

#[test]
fn gpt_oss_glu_parameters_are_set_only_on_gpt_oss_experts() {
    let tmp = dir("glu");
    let dir = tmp.path();
    let (path, prefix) = write(dir, Layout::GptOss, DiskDtype::F32);
    let src = DiskSource::open(&path, prefix)
        .expect("open")
        .with_gpt_oss_glu(1.5, 6.0)
        .expect("gpt-oss");
    assert!(
        matches!(src.form(), ExpertForm::GptOss { alpha, limit, .. } if *alpha == 1.5 && *limit == 6.0)
    );
    let (path, prefix) = write(dir, Layout::Fused, DiskDtype::F32);
    let err = DiskSource::open(&path, prefix)
        .expect("open")
        .with_gpt_oss_glu(1.5, 6.0)
        .expect_err("swiglu");
    assert!(err.to_string().contains("swiglu"), "{err}");
}

#[test]
fn cold_reads_and_dropping_the_page_cache_keep_the_values() {
    let tmp = dir("cold");
    let dir = tmp.path();
    let (path, prefix) = write(dir, Layout::Fused, DiskDtype::Bf16);
    let warm = DiskSource::open(&path, prefix).expect("open");
    let want: Vec<_> = (0..E)
        .map(|e| bits(&load(&warm, e).expect("load")))
        .collect();
    warm.drop_page_cache().expect("drop the page cache");
    let cold = DiskSource::open(&path, prefix)
        .expect("open")
        .with_cold_reads(true)
        .expect("cold");
    assert!(cold.cold_reads());
    for e in (0..E).rev() {
        assert_eq!(
            bits(&load(&cold, e).expect("cold load")),
            want[e],
            "expert {e}"
        );
    }
    let back = cold.with_cold_reads(false).expect("warm again");
    assert!(!back.cold_reads());
    assert_eq!(bits(&load(&back, 1).expect("load")), want[1]);
}

#[test]
fn two_threads_sharing_a_source_load_the_same_values() {
    let tmp = dir("threads");
    let dir = tmp.path();
    let (path, prefix) = write(dir, Layout::PerExpert, DiskDtype::Bf16);
    let src = Arc::new(DiskSource::open(&path, prefix).expect("open"));
    let want: Vec<_> = (0..E)
        .map(|e| bits(&load(src.as_ref(), e).expect("load")))
        .collect();
    let handles: Vec<_> = (0..2)
        .map(|t| {
            let src = Arc::clone(&src);
            std::thread::spawn(move || {
                // Each thread walks the experts many times, in its own order.
                let mut got = Vec::new();
                for round in 0..50 {
                    let e = (round * (2 * t + 1) + t) % E;
                    got.push((e, bits(&load(src.as_ref(), e).expect("load"))));
                }
                got
            })
        })
        .collect();
    for h in handles {
        for (e, got) in h.join().expect("the thread finished") {
            assert_eq!(got, want[e], "expert {e}");
        }
    }
}

#[test]
fn the_writer_replaces_files_atomically_and_refuses_zero_sizes() {
    let tmp = dir("writer");
    let dir = tmp.path();
    let path = dir.join("w.safetensors");
    for seed in [1, 2] {
        write_expert_checkpoint(
            &path,
            "p.",
            Layout::Mixtral,
            3,
            4,
            2,
            DiskDtype::F32,
            seed,
            false,
        )
        .expect("write");
    }
    let names: Vec<_> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("w.safetensors")],
        "no temporary file is left"
    );
    let src = DiskSource::open(&path, "p.").expect("open");
    assert_eq!(src.n_experts(), 3);
    for (field, (n, d, f)) in [("n_experts", (0, 4, 2)), ("d", (3, 0, 2)), ("f", (3, 4, 0))] {
        let err =
            write_expert_checkpoint(&path, "p.", Layout::Fused, n, d, f, DiskDtype::F32, 1, true)
                .expect_err("a zero size");
        assert!(err.to_string().contains(field), "{err}");
    }
    let missing_dir = dir.join("absent").join("w.safetensors");
    let err = write_expert_checkpoint(
        &missing_dir,
        "p.",
        Layout::Fused,
        2,
        2,
        2,
        DiskDtype::F32,
        1,
        true,
    )
    .expect_err("no directory");
    assert!(matches!(err, LoadError::Io { .. }), "{err:?}");
}

#[test]
fn loads_do_not_allocate_after_the_first() {
    let tmp = dir("alloc");
    let dir = tmp.path();
    for layout in [Layout::PerExpert, Layout::Fused, Layout::GptOss] {
        let (path, prefix) = write(dir, layout, DiskDtype::Bf16);
        let src = DiskSource::open(&path, prefix).expect("open");
        let mut out: Vec<Vec<f32>> = src
            .form()
            .tensors()
            .iter()
            .map(|(_, n)| vec![0.0; *n])
            .collect();
        let mut dst: Vec<&mut [f32]> = out.iter_mut().map(Vec::as_mut_slice).collect();
        // The first load of this thread sizes its buffer.
        src.load(0, &mut dst).expect("load");
        ALLOCS.with(|c| c.set(Some(0)));
        for e in (0..E).rev() {
            src.load(e, &mut dst).expect("load");
        }
        let n = ALLOCS.with(|c| c.replace(None));
        assert_eq!(n, Some(0), "{}: allocations in {E} loads", layout.name());
    }
}

#[test]
fn the_hf_fixtures_experts_load_as_their_layers_banks() {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/hf"));
    let manifest = moe_models::fixture::Manifest::read(dir).expect("manifest");
    let mut checked = Vec::new();
    for case in &manifest.cases {
        let fx = moe_models::fixture::FixtureCase::load(dir, case).expect("fixture loads");
        let bank = fx.layer.experts();
        // JetMoE and GraniteMoE name their SwiGLU experts otherwise (`input_linear`): not a disk-store layout.
        if !matches!(
            case.model_type(),
            "mixtral" | "qwen2_moe" | "olmoe" | "deepseek_v3" | "gpt_oss"
        ) {
            continue;
        }
        // The fixtures hold one block's state dict, unprefixed, as transformers 5 writes it (fused experts).
        let src = DiskSource::open(&fx.path, "").expect("open the fixture as a disk source");
        let src = match src.layout() {
            Layout::GptOss => src
                .with_gpt_oss_glu(fx.config.swiglu_alpha, fx.config.swiglu_limit)
                .expect("gpt-oss"),
            _ => src,
        };
        let name = &case.name;
        assert_eq!(src.form(), &ExpertForm::of(bank).expect("form"), "{name}");
        assert_eq!(src.n_experts(), bank.n_experts(), "{name}");
        let params = bank.params();
        for e in 0..bank.n_experts() {
            let want: Vec<Vec<f32>> = params
                .iter()
                .map(|p| {
                    let all = p.value.as_slice().expect("contiguous");
                    let n = all.len() / bank.n_experts();
                    all[e * n..(e + 1) * n].to_vec()
                })
                .collect();
            assert_eq!(
                bits(&load(&src, e).expect("load")),
                bits(&want),
                "{name} expert {e}"
            );
        }
        checked.push(name.clone());
    }
    // Mixtral, Qwen2-MoE, OLMoE, DeepSeek-V3 (routed experts) and GPT-OSS at least.
    assert!(checked.len() >= 5, "{checked:?}");
}
