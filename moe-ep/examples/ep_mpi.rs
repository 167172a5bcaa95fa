//! The expert-parallel layer under MPI, one rank per process:
//! `mpirun --oversubscribe --allow-run-as-root -np R target/debug/examples/ep_mpi [MODE]`.
//!
//! - `identity` (default): for every grouped bank kind × router (softmax-topk, switch-top1 with drops,
//!   expert-choice, noisy-topk trained with noise, hash) with shared experts and output bias, contiguous and
//!   interleaved placements, each rank's output equals the single-rank layer's on its own tokens bit for bit, and
//!   (for the routers with a backward) `dL/dx` and the non-expert gradients too, and each owner's expert gradients
//!   equal the single-rank gradients summed over the ranks in rank order. Prints one line per rank; exit 0.
//! - `bad-input`: rank 1 passes a NaN; it reports the non-finite value and every other rank reports that rank 1
//!   failed; exit 0 when every rank saw what it should.
//! - `mismatch`: rank 1 builds its layer from another seed; every rank refuses the layer at start; exit 0 when
//!   each did.
//!
//! Any other outcome prints one `error:` line and exits 1.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::ExitCode;
use std::sync::Arc;

use ndarray::Axis;

use moe_backends::cpu::CpuBackend;
use moe_core::testing::{BANK_KINDS, routing_fingerprint};
use moe_core::{Backend, GradValue, MoeError};
use moe_ep::mpi::MpiComm;
use moe_ep::{Communicator, EpLayer, EpOptions, Placement};

use common::{ROUTERS, Spec, input, layer, tokens};

/// Rank `r`'s token count: uneven, one rank with none, groups across the CPU's 48- and 256-row kernel classes.
fn tokens_of(rank: usize) -> usize {
    [37, 0, 290, 5][rank % 4]
}

fn spec(kind: u8, router: u8, seed: u64) -> Spec {
    Spec {
        kind,
        router,
        e: 6,
        k: 2,
        d: 112,
        f: 208,
        shared: true,
        bias: true,
        scale: seed.is_multiple_of(2),
        seed,
    }
}

fn bits(a: &ndarray::Array2<f32>) -> Vec<u32> {
    a.iter().map(|v| v.to_bits()).collect()
}

/// One layer's check on this rank; `Err` names what differs.
fn check_one(s: &Spec, ep: &mut EpLayer) -> Result<(), String> {
    let rank = ep.rank();
    let (x, ids) = tokens(s.seed, rank, tokens_of(rank), s.d);
    let backend = CpuBackend::with_threads(1);
    let mut single = backend
        .upload(Arc::new(layer(s)))
        .map_err(|e| e.to_string())?;
    let err = |e: MoeError| e.to_string();
    let out = ep.forward(&input(&x, &ids, false)).map_err(err)?;
    let want = single.forward(&input(&x, &ids, false)).map_err(err)?;
    if bits(&out.output) != bits(&want.output)
        || routing_fingerprint(&out.routing) != routing_fingerprint(&want.routing)
    {
        return Err("forward differs from one rank".into());
    }
    if s.router == 4 {
        return Ok(()); // hash routing has no backward
    }
    let out = ep.forward_train(&input(&x, &ids, true)).map_err(err)?;
    let want = single.forward_train(&input(&x, &ids, true)).map_err(err)?;
    if bits(&out.output) != bits(&want.output) {
        return Err("training forward differs from one rank".into());
    }
    let d_out =
        moe_core::rng::SeqRng::new(s.seed, 500 + rank as u64).normal_matrix(x.nrows(), s.d, 1.0);
    let aux = want.routing.aux_coefficients();
    let got = ep.backward(d_out.view(), &aux).map_err(err)?;
    let want = single.backward(d_out.view(), &aux).map_err(err)?;
    if bits(&got.d_input) != bits(&want.d_input) {
        return Err("d_input differs from one rank".into());
    }
    let experts = ep.take_expert_grads().map_err(err)?;
    let owned: Vec<usize> = ep.owned_experts().iter().map(|&e| e as usize).collect();
    for g in &want.params {
        let GradValue::Dense(v) = &g.value else {
            return Err(format!("{} is not dense", g.name));
        };
        if !g.name.starts_with("experts.") {
            if got.get(&g.name).map(|x| &x.value) != Some(&g.value) {
                return Err(format!("gradient {} differs from one rank", g.name));
            }
            continue;
        }
        // Every rank's single-rank gradient, summed in rank order on every rank.
        let mut sum = v.iter().copied().collect::<Vec<f32>>();
        ep.comm_mut().all_reduce_sum(&mut sum).map_err(err)?;
        let sum = ndarray::ArrayD::from_shape_vec(v.raw_dim(), sum).map_err(|e| e.to_string())?;
        if owned.is_empty() {
            continue;
        }
        let mine = experts
            .iter()
            .find(|x| x.name == g.name)
            .ok_or_else(|| format!("no expert gradient {}", g.name))?;
        if mine.value != GradValue::Dense(sum.select(Axis(0), &owned)) {
            return Err(format!(
                "expert gradient {} differs from the ranks' sum",
                g.name
            ));
        }
    }
    Ok(())
}

fn identity(comm: MpiComm) -> Result<String, String> {
    let ranks = comm.size();
    let mut comm: Option<Box<dyn Communicator>> = Some(Box::new(comm));
    let mut cases = 0;
    for kind in 0..BANK_KINDS {
        for router in 0..ROUTERS {
            for interleaved in [false, true] {
                let s = spec(
                    kind,
                    router,
                    1000 + u64::from(kind) * 10 + u64::from(router),
                );
                let placement = if interleaved {
                    Placement::from_owners(
                        (0..s.e).map(|e| ((3 * e + 1) % ranks) as u32).collect(),
                        ranks,
                    )
                } else {
                    Placement::contiguous(s.e, ranks)
                }
                .map_err(|e| e.to_string())?;
                let options = EpOptions {
                    placement,
                    rank_capacity: None,
                };
                let c = comm.take().ok_or("communicator lost")?;
                let mut ep =
                    EpLayer::new(&CpuBackend::with_threads(1), &layer(&s), options.clone(), c)
                        .map_err(|e| e.to_string())?;
                check_one(&s, &mut ep).map_err(|e| {
                    format!("bank kind {kind}, router {router}, interleaved {interleaved}: {e}")
                })?;
                comm = Some(ep.into_comm());
                cases += 1;
            }
        }
    }
    Ok(format!("{cases} layers identical to one rank"))
}

fn bad_input(comm: MpiComm) -> Result<String, String> {
    let rank = comm.rank();
    let s = spec(0, 0, 7);
    let options = EpOptions::contiguous(s.e, comm.size()).map_err(|e| e.to_string())?;
    let mut ep = EpLayer::new(
        &CpuBackend::with_threads(1),
        &layer(&s),
        options,
        Box::new(comm),
    )
    .map_err(|e| e.to_string())?;
    let (mut x, ids) = tokens(7, rank, 9, s.d);
    if rank == 1 {
        x[[3, 5]] = f32::NAN;
    }
    let e = ep
        .forward(&input(&x, &ids, false))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    let ok = if rank == 1 {
        e.contains("non-finite")
    } else {
        e.contains("rank 1 failed")
    };
    if !ok {
        return Err(format!("unexpected outcome: `{e}`"));
    }
    // The next step works on every rank.
    x[[3, 5]] = 0.0;
    ep.forward(&input(&x, &ids, false))
        .map_err(|e| e.to_string())?;
    Ok(format!("saw `{e}`, then stepped on"))
}

fn mismatch(comm: MpiComm) -> Result<String, String> {
    let rank = comm.rank();
    let s = spec(0, 0, if rank == 1 { 8 } else { 7 });
    let options = EpOptions::contiguous(s.e, comm.size()).map_err(|e| e.to_string())?;
    match EpLayer::new(
        &CpuBackend::with_threads(1),
        &layer(&s),
        options,
        Box::new(comm),
    ) {
        Ok(_) => Err("a layer that differs across ranks was accepted".into()),
        Err(e) if e.to_string().contains("layer differs") => Ok(format!("refused: {e}")),
        Err(e) => Err(format!("unexpected error: {e}")),
    }
}

fn main() -> ExitCode {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "identity".into());
    let comm = match MpiComm::world() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rank = comm.rank();
    let result = match mode.as_str() {
        "identity" => identity(comm),
        "bad-input" => bad_input(comm),
        "mismatch" => mismatch(comm),
        other => Err(format!(
            "unknown mode {other} (identity, bad-input, mismatch)"
        )),
    };
    match result {
        Ok(msg) => {
            println!("rank {rank}: ok: {msg}");
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("error: rank {rank}: {msg}");
            ExitCode::FAILURE
        }
    }
}
