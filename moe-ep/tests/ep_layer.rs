//! The expert-parallel layer on thread ranks against the single-rank layer on each rank's own tokens: outputs bit
//! for bit and routing identical for every grouped bank kind, several routers (drops, expert choice, noise, hash),
//! shared experts, output scale and bias, 1 to 4 ranks with uneven token counts (some zero) and placements;
//! training: `dL/dx` and the router / shared / bias gradients identical, each owner's expert gradients equal to
//! the single-rank gradients summed over the ranks in rank order; bytes sent equal the plan's wire sizes; rank
//! capacity; faults (a rank's bad input, a rank that stalls or leaves, ranks with different layers).

use std::time::{Duration, Instant};

use ndarray::{Array2, Axis};
use proptest::prelude::*;

use moe_backends::cpu::CpuBackend;
use moe_core::rng::SeqRng;
use moe_core::testing::{BANK_KINDS, routing_fingerprint};
use moe_core::{Backend, GradValue, LayerGrads, LayerOutput, MoeError, MoeLayer};
use moe_ep::plan::{combine_bytes, dispatch_bytes, dispatch_plan};
use moe_ep::{Communicator, EpLayer, EpOptions, Placement, ThreadComm};

mod common;
use common::{ROUTERS, Spec, input, layer, tokens};

fn bits(a: &Array2<f32>) -> Vec<u32> {
    a.iter().map(|v| v.to_bits()).collect()
}

fn single(l: &MoeLayer, x: &Array2<f32>, ids: &[u32], train: bool) -> LayerOutput {
    let mut dev = CpuBackend::with_threads(1)
        .upload(std::sync::Arc::new(l.clone()))
        .unwrap_or_else(|err| panic!("upload: {err}"));
    dev.forward(&input(x, ids, train))
        .unwrap_or_else(|err| panic!("single-rank forward: {err}"))
}

/// Runs `f(rank, layer)` on `ranks` thread ranks, each with its `EpLayer`.
fn on_ranks<R: Send>(
    l: &MoeLayer,
    options: &EpOptions,
    ranks: usize,
    f: impl Fn(usize, &mut EpLayer) -> R + Sync,
) -> Vec<R> {
    ThreadComm::run(ranks, |comm| {
        let rank = comm.rank();
        let mut ep = EpLayer::new(
            &CpuBackend::with_threads(1),
            l,
            options.clone(),
            Box::new(comm),
        )
        .unwrap_or_else(|err| panic!("rank {rank}: {err}"));
        f(rank, &mut ep)
    })
    .unwrap_or_else(|err| panic!("{err}"))
}

fn placement(e: usize, ranks: usize, shuffled: bool) -> Placement {
    if shuffled {
        // Expert e on rank (3e + 1) mod R: owners interleaved, not blocks.
        Placement::from_owners(
            (0..e).map(|x| ((3 * x + 1) % ranks) as u32).collect(),
            ranks,
        )
        .unwrap_or_else(|err| panic!("{err}"))
    } else {
        Placement::contiguous(e, ranks).unwrap_or_else(|err| panic!("{err}"))
    }
}

fn spec_strategy() -> impl Strategy<Value = (Spec, usize, bool, Vec<usize>)> {
    (
        0..BANK_KINDS,
        0..ROUTERS,
        2usize..10,
        1usize..4,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
        1usize..5,
        any::<bool>(),
        prop::collection::vec(prop_oneof![Just(0usize), 1usize..80, 200usize..320], 4),
    )
        .prop_map(
            |(kind, router, e, k, shared, bias, scale, seed, ranks, shuffled, ts)| {
                let spec = Spec {
                    kind,
                    router,
                    e,
                    k: k.min(e),
                    // Wider than the CPU's smallest column blocks (96 output, 192 hidden columns), so the
                    // tiles depend on the plan's largest group: an owner must tile with the source's plan.
                    d: 112,
                    f: 208,
                    shared,
                    bias,
                    scale,
                    seed,
                };
                (spec, ranks, shuffled, ts)
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, rng_seed: proptest::test_runner::RngSeed::Fixed(20), ..ProptestConfig::default() })]

    /// Forward and training on R ranks equal one rank on each rank's tokens.
    #[test]
    fn expert_parallel_equals_one_rank((spec, ranks, shuffled, ts) in spec_strategy()) {
        let l = layer(&spec);
        let options = EpOptions { placement: placement(spec.e, ranks, shuffled), rank_capacity: None };
        let train_routers = spec.router != 4; // hash routing has no backward
        let results = on_ranks(&l, &options, ranks, |rank, ep| {
            let (x, ids) = tokens(spec.seed, rank, ts[rank], spec.d);
            let out = ep.forward(&input(&x, &ids, false)).unwrap_or_else(|err| panic!("rank {rank}: {err}"));
            let trained = train_routers.then(|| {
                let out_t = ep.forward_train(&input(&x, &ids, true)).unwrap_or_else(|err| panic!("rank {rank}: {err}"));
                let d_out = SeqRng::new(spec.seed, 500 + rank as u64).normal_matrix(ts[rank], spec.d, 1.0);
                let d_aux = out_t.routing.aux_coefficients();
                let grads = ep.backward(d_out.view(), &d_aux).unwrap_or_else(|err| panic!("rank {rank}: {err}"));
                let experts = ep.take_expert_grads().unwrap_or_else(|err| panic!("rank {rank}: {err}"));
                (out_t, grads, experts, ep.owned_experts().to_vec())
            });
            (out, trained, ep.stats().clone())
        });
        let mut expert_sums: Vec<Option<ndarray::ArrayD<f32>>> = Vec::new();
        let mut names = Vec::new();
        for (rank, (out, trained, stats)) in results.iter().enumerate() {
            let (x, ids) = tokens(spec.seed, rank, ts[rank], spec.d);
            let want = single(&l, &x, &ids, false);
            prop_assert_eq!(bits(&out.output), bits(&want.output), "rank {} forward", rank);
            prop_assert_eq!(routing_fingerprint(&out.routing), routing_fingerprint(&want.routing));
            // Bytes to other ranks: exactly the plan's wire sizes (forward, training forward, backward).
            let plan = dispatch_plan(&want.routing, &options.placement);
            let fwd: usize = plan.owners.iter().enumerate().filter(|(o, _)| *o != rank)
                .map(|(_, g)| dispatch_bytes(g.groups(), g.rows(), spec.d, false)).sum();
            if !train_routers {
                prop_assert_eq!(stats.dispatch_bytes as usize, fwd);
            }
            let Some((out_t, grads, experts, owned)) = trained else { continue };
            let mut dev = CpuBackend::with_threads(1).upload(std::sync::Arc::new(l.clone()))
                .unwrap_or_else(|err| panic!("{err}"));
            let want_t = dev.forward_train(&input(&x, &ids, true)).unwrap_or_else(|err| panic!("{err}"));
            prop_assert_eq!(bits(&out_t.output), bits(&want_t.output), "rank {} training forward", rank);
            let d_out = SeqRng::new(spec.seed, 500 + rank as u64).normal_matrix(ts[rank], spec.d, 1.0);
            let want_g: LayerGrads = dev.backward(d_out.view(), &want_t.routing.aux_coefficients())
                .unwrap_or_else(|err| panic!("{err}"));
            prop_assert_eq!(bits(&grads.d_input), bits(&want_g.d_input), "rank {} d_input", rank);
            for g in &want_g.params {
                if g.name.starts_with("experts.") {
                    let GradValue::Dense(v) = &g.value else { panic!("sparse expert grad") };
                    if !names.contains(&g.name) {
                        names.push(g.name.clone());
                        expert_sums.push(None);
                    }
                    let i = names.iter().position(|n| n == &g.name).unwrap_or(0);
                    // Added in rank order, as each owner adds its sources' gradients.
                    expert_sums[i] = Some(match expert_sums[i].take() { None => v.clone(), Some(acc) => acc + v });
                    continue;
                }
                let got = grads.get(&g.name).unwrap_or_else(|| panic!("rank {rank}: no gradient {}", g.name));
                prop_assert_eq!(&got.value, &g.value, "rank {} gradient {}", rank, &g.name);
            }
            prop_assert!(grads.params.iter().all(|g| !g.name.starts_with("experts.")));
            let _ = (experts, owned);
        }
        // Each owner's expert gradients: the single-rank ones summed over ranks in rank order, its experts' rows.
        for (rank, (_, trained, _)) in results.iter().enumerate() {
            let Some((_, _, experts, owned)) = trained else { continue };
            let ids: Vec<usize> = owned.iter().map(|&e| e as usize).collect();
            for g in experts {
                let i = names.iter().position(|n| n == &g.name).unwrap_or_else(|| panic!("rank {rank}: unexpected {}", g.name));
                let want = expert_sums[i].as_ref().map(|a| a.select(Axis(0), &ids)).unwrap_or_else(|| panic!("no sum"));
                let GradValue::Dense(v) = &g.value else { panic!("sparse") };
                // Values compared as numbers: -0 and +0 are the same gradient.
                prop_assert_eq!(v, &want, "rank {} expert gradient {}", rank, &g.name);
            }
            if !ids.is_empty() {
                prop_assert_eq!(experts.len(), names.len(), "rank {}", rank);
            }
        }
    }
}

fn small_spec(seed: u64) -> Spec {
    Spec {
        kind: 0,
        router: 0,
        e: 8,
        k: 2,
        d: 16,
        f: 24,
        shared: true,
        bias: true,
        scale: false,
        seed,
    }
}

#[test]
fn rank_capacity_drops_past_the_owners_budget_and_counts_them() {
    let spec = small_spec(3);
    let l = layer(&spec);
    let ranks = 2;
    let options = EpOptions {
        placement: Placement::contiguous(8, ranks).unwrap_or_else(|e| panic!("{e}")),
        rank_capacity: Some(0.5),
    };
    let ts = [40usize, 40];
    let out = on_ranks(&l, &options, ranks, |rank, ep| {
        let (x, ids) = tokens(3, rank, ts[rank], 16);
        let out = ep
            .forward(&input(&x, &ids, false))
            .unwrap_or_else(|e| panic!("{e}"));
        (out, ep.stats().clone())
    });
    // 2 ranks × 40 tokens × top-2 = 160 slots; each owner runs at most ⌈0.5 · 160 / 2⌉ = 40 rows.
    let total_dropped: u64 = out.iter().map(|(_, s)| s.dropped).sum();
    let run: u64 = out.iter().map(|(_, s)| s.rows_run).sum();
    assert_eq!(run + total_dropped, 160);
    assert!(out.iter().all(|(_, s)| s.rows_run <= 40));
    assert!(total_dropped >= 80, "dropped {total_dropped}");
    // Without capacity the same run drops nothing; with it outputs differ only where a slot was dropped.
    for (rank, (o, _)) in out.iter().enumerate() {
        let (x, ids) = tokens(3, rank, ts[rank], 16);
        let want = single(&l, &x, &ids, false);
        assert!(o.output.iter().all(|v| v.is_finite()));
        assert_eq!(
            routing_fingerprint(&o.routing),
            routing_fingerprint(&want.routing)
        );
    }
}

#[test]
fn a_rank_with_bad_input_fails_and_the_others_name_it() {
    let spec = small_spec(5);
    let l = layer(&spec);
    let options = EpOptions::contiguous(8, 3).unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now();
    let out = on_ranks(&l, &options, 3, |rank, ep| {
        ep.comm_mut().set_timeout(Duration::from_secs(20));
        let (mut x, ids) = tokens(5, rank, 10, 16);
        if rank == 1 {
            x[[4, 2]] = f32::NAN;
        }
        let first = ep.forward(&input(&x, &ids, false)).err();
        // The next step works again on every rank.
        x[[4, 2]] = 0.5;
        let second = ep.forward(&input(&x, &ids, false));
        (first, second.is_ok())
    });
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "the failure was not reported promptly"
    );
    match &out[1].0 {
        Some(MoeError::NonFinite { token: 4, .. }) => {}
        other => panic!("rank 1: {other:?}"),
    }
    for r in [0, 2] {
        let msg = out[r].0.as_ref().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("rank 1 failed") && msg.contains("non-finite"),
            "rank {r}: {msg}"
        );
    }
    assert!(out.iter().all(|(_, ok)| *ok));
}

#[test]
fn a_rank_that_stalls_or_leaves_fails_the_others_within_the_timeout() {
    let spec = small_spec(6);
    let l = layer(&spec);
    let options = EpOptions::contiguous(8, 3).unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now();
    let out = on_ranks(&l, &options, 3, |rank, ep| {
        ep.comm_mut().set_timeout(Duration::from_millis(500));
        let (x, ids) = tokens(6, rank, 10, 16);
        match rank {
            2 => {
                std::thread::sleep(Duration::from_millis(1500));
                None
            }
            _ => ep
                .forward(&input(&x, &ids, false))
                .err()
                .map(|e| e.to_string()),
        }
    });
    assert!(start.elapsed() < Duration::from_secs(10));
    for r in [0, 1] {
        let msg = out[r].clone().unwrap_or_default();
        assert!(
            msg.contains("rank 2") && (msg.contains("timeout") || msg.contains("left")),
            "rank {r}: {msg}"
        );
    }
}

#[test]
fn ranks_with_different_layers_are_refused_at_start_on_every_rank() {
    let l0 = layer(&small_spec(7));
    let l1 = layer(&small_spec(8)); // another router seed: another gate
    let options = EpOptions::contiguous(8, 2).unwrap_or_else(|e| panic!("{e}"));
    let out = ThreadComm::run(2, |comm| {
        let l = if comm.rank() == 0 { &l0 } else { &l1 };
        EpLayer::new(
            &CpuBackend::with_threads(1),
            l,
            options.clone(),
            Box::new(comm),
        )
        .err()
        .map(|e| e.to_string())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    for (r, msg) in out.iter().enumerate() {
        let msg = msg.clone().unwrap_or_default();
        assert!(
            msg.contains("layer differs") && msg.contains("router options and params"),
            "rank {r}: {msg}"
        );
    }
    // Routed experts that differ (the same router), and a hash router of another seed (no parameters: its table
    // differs), are refused too.
    let other = l0
        .with_experts(moe_core::testing::random_bank(
            0,
            8,
            16,
            24,
            &mut SeqRng::new(99, 1),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let hash = |seed| {
        layer(&Spec {
            router: 4,
            ..small_spec(seed)
        })
    };
    for (a, b, field) in [
        (&l0, &other, "expert, shared and output-bias params"),
        (&hash(7), &hash(8), "router options and params"),
    ] {
        let out = ThreadComm::run(2, |comm| {
            let l = if comm.rank() == 0 { a } else { b };
            EpLayer::new(
                &CpuBackend::with_threads(1),
                l,
                options.clone(),
                Box::new(comm),
            )
            .err()
            .map(|e| e.to_string())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        for msg in out {
            let msg = msg.unwrap_or_default();
            assert!(
                msg.contains("layer differs") && msg.contains(field),
                "{msg}"
            );
        }
    }
    // A placement of another rank count is refused on every rank too, without a hang.
    let bad = EpOptions::contiguous(8, 3).unwrap_or_else(|e| panic!("{e}"));
    let out = ThreadComm::run(2, |comm| {
        let o = if comm.rank() == 0 {
            bad.clone()
        } else {
            options.clone()
        };
        EpLayer::new(&CpuBackend::with_threads(1), &l0, o, Box::new(comm))
            .err()
            .map(|e| e.to_string())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out[0].clone().unwrap_or_default().contains("placement"),
        "{:?}",
        out[0]
    );
    assert!(
        out[1].clone().unwrap_or_default().contains("rank 0"),
        "{:?}",
        out[1]
    );
}

#[test]
fn measured_bytes_messages_and_loads_equal_the_wire_format_and_the_cost_model() {
    let spec = small_spec(9);
    let l = layer(&spec);
    let options = EpOptions::contiguous(8, 4).unwrap_or_else(|e| panic!("{e}"));
    let ts = [30usize, 0, 17, 5];
    let out = on_ranks(&l, &options, 4, |rank, ep| {
        let (x, ids) = tokens(9, rank, ts[rank], 16);
        let r = ep
            .forward(&input(&x, &ids, false))
            .unwrap_or_else(|e| panic!("{e}"));
        (r.routing, ep.stats().clone())
    });
    // What rank o sends back to s answers what s sent o: combine bytes of o = Σ_s≠o answers.
    let plans: Vec<_> = out
        .iter()
        .map(|(r, _)| dispatch_plan(r, &options.placement))
        .collect();
    // The cost model counts the same bytes, messages and loads.
    let traffic = moe_ep::Traffic::from_plans(&plans, 16).unwrap_or_else(|e| panic!("{e}"));
    for (r, (_, stats)) in out.iter().enumerate() {
        assert_eq!(
            traffic.bytes_sent(r),
            stats.dispatch_bytes + stats.combine_bytes,
            "rank {r}"
        );
        assert_eq!(traffic.messages_sent(r), stats.messages, "rank {r}");
        assert_eq!(traffic.rows_received(r), stats.rows_run, "rank {r}");
    }
    for (o, (_, stats)) in out.iter().enumerate() {
        let want: usize = (0..4)
            .filter(|&s| s != o)
            .map(|s| {
                let g = &plans[s].owners[o];
                combine_bytes(g.rows() > 0, g.rows(), 0, 16)
            })
            .sum();
        assert_eq!(stats.combine_bytes as usize, want, "rank {o}");
        let sent: usize = (0..4)
            .filter(|&x| x != o)
            .map(|x| {
                let g = &plans[o].owners[x];
                dispatch_bytes(g.groups(), g.rows(), 16, false)
            })
            .sum();
        assert_eq!(stats.dispatch_bytes as usize, sent, "rank {o}");
    }
}

/// A custom expert: `y = tanh(x) · (1 + e / 4)`.
#[derive(Debug, Clone)]
struct Tanh {
    d: usize,
    e: usize,
}

impl moe_core::Expert for Tanh {
    fn d_model(&self) -> usize {
        self.d
    }

    fn forward(&self, x: ndarray::ArrayView2<'_, f32>) -> Result<Array2<f32>, MoeError> {
        let s = 1.0 + self.e as f32 / 4.0;
        Ok(x.mapv(|v| v.tanh() * s))
    }
}

#[test]
fn custom_experts_run_on_their_owners_bit_identical_to_one_rank() {
    let (d, e) = (112, 6);
    let bank = moe_core::ExpertBank::Custom(
        (0..e)
            .map(|i| -> Box<dyn moe_core::Expert> { Box::new(Tanh { d, e: i }) })
            .collect(),
    );
    let mut rng = moe_core::rng::SeqRng::new(4, 4);
    let shared =
        moe_core::SharedExperts::new(moe_core::testing::random_bank(0, 1, d, 208, &mut rng), None)
            .unwrap_or_else(|err| panic!("{err}"));
    let l = MoeLayer::new(common::router(0, d, e, 2, 4), bank)
        .and_then(|l| l.with_shared(shared))
        .unwrap_or_else(|err| panic!("{err}"));
    let options = EpOptions::contiguous(e, 3).unwrap_or_else(|err| panic!("{err}"));
    let ts = [40usize, 0, 300];
    let out = on_ranks(&l, &options, 3, |rank, ep| {
        let (x, ids) = tokens(4, rank, ts[rank], d);
        ep.forward(&input(&x, &ids, false))
            .unwrap_or_else(|err| panic!("rank {rank}: {err}"))
    });
    for (rank, o) in out.iter().enumerate() {
        let (x, ids) = tokens(4, rank, ts[rank], d);
        assert_eq!(
            bits(&o.output),
            bits(&single(&l, &x, &ids, false).output),
            "rank {rank}"
        );
    }
}

#[test]
fn packed_experts_run_on_their_owners_bit_identical_to_one_rank_and_differing_ones_are_refused() {
    use moe_core::WeightFormat;
    let (d, e) = (64, 6);
    let mut rng = moe_core::rng::SeqRng::new(9, 1);
    let f32_layer = MoeLayer::new(
        common::router(0, d, e, 2, 4),
        moe_core::testing::random_bank(1, e, d, 96, &mut rng),
    )
    .unwrap_or_else(|err| panic!("{err}"));
    let options = EpOptions::contiguous(e, 3).unwrap_or_else(|err| panic!("{err}"));
    let ts = [33usize, 0, 70];
    for format in [WeightFormat::Int8, WeightFormat::Mxfp4] {
        let l = f32_layer
            .quantized(format)
            .unwrap_or_else(|err| panic!("{err}"));
        let out = on_ranks(&l, &options, 3, |rank, ep| {
            let (x, ids) = tokens(5, rank, ts[rank], d);
            ep.forward(&input(&x, &ids, false))
                .unwrap_or_else(|err| panic!("rank {rank}: {err}"))
        });
        for (rank, o) in out.iter().enumerate() {
            let (x, ids) = tokens(5, rank, ts[rank], d);
            assert_eq!(
                bits(&o.output),
                bits(&single(&l, &x, &ids, false).output),
                "{format}, rank {rank}"
            );
        }
    }
    // Ranks holding the same experts in different formats are refused at start.
    let layers = [
        f32_layer.quantized(WeightFormat::Int8),
        f32_layer.quantized(WeightFormat::Fp8),
    ]
    .map(|l| l.unwrap_or_else(|err| panic!("{err}")));
    let errors = ThreadComm::run(2, |comm| {
        let rank = comm.rank();
        EpLayer::new(
            &CpuBackend::with_threads(1),
            &layers[rank],
            options_for(e),
            Box::new(comm),
        )
        .err()
    })
    .unwrap_or_else(|err| panic!("{err}"));
    for err in errors {
        assert!(
            matches!(err, Some(MoeError::InvalidConfig { .. })),
            "{err:?}"
        );
    }
}

fn options_for(e: usize) -> EpOptions {
    EpOptions::contiguous(e, 2).unwrap_or_else(|err| panic!("{err}"))
}
