//! The NCCL communicator on real GPUs, one per rank, ranks as threads bootstrapped by `ThreadComm`: its
//! all-to-all-v against the thread ranks' on the same messages (variable counts, empty messages, a rank's own,
//! a message over 1 MiB), the rank-order all-reduce bit-identical to the threads', the barrier, and a rank that
//! leaves making the other fail within its timeout.
//!
//! Without two GPUs and libnccl every test prints why and returns, unless `MOE_REQUIRE_GPU=nccl` is set: then a
//! missing GPU or library fails the test. Run on a machine with two or more GPUs:
//! `MOE_REQUIRE_GPU=nccl cargo test -p moe-ep --features nccl --test nccl`. Not run yet: no multi-GPU machine was
//! lent (see `moe-ep/src/nccl.rs`).
#![cfg(feature = "nccl")]

use std::time::{Duration, Instant};

use moe_ep::{Communicator, NcclComm, ThreadComm};

/// How many ranks to run (2 to 4, one GPU each), or `None` (after printing why) without two GPUs.
fn ranks() -> Option<usize> {
    let why = match NcclComm::available() {
        Ok(gpus) if gpus >= 2 => return Some(gpus.min(4)),
        Ok(gpus) => format!("{gpus} GPU, NCCL needs one per rank and these tests two ranks"),
        Err(why) => why,
    };
    if std::env::var("MOE_REQUIRE_GPU").is_ok_and(|v| v == "nccl") {
        panic!("MOE_REQUIRE_GPU=nccl but NCCL cannot run: {why}");
    }
    eprintln!("skipping: NCCL unavailable: {why}");
    None
}

/// Rank `r`'s message to rank `d`: `(r * 7 + d * 3) % 5` KiB-ish, some empty, one over 1 MiB; bytes that name
/// their source, destination and position.
fn message(r: usize, d: usize) -> Vec<u8> {
    let len = match (r * 7 + d * 3) % 5 {
        0 => 0,
        1 => 1,
        2 => 1000,
        3 => 65_537,
        _ => (1 << 20) + 3,
    };
    (0..len).map(|i| (r * 31 + d * 17 + i * 13) as u8).collect()
}

/// Every rank's all-to-all-v, all-gather and all-reduce over NCCL equal the thread ranks' on the same input,
/// byte for byte and bit for bit; the barrier passes.
#[test]
fn nccl_matches_thread_ranks() {
    let Some(n) = ranks() else { return };
    let results = ThreadComm::run(n, |mut boot| {
        let r = boot.rank();
        let mut nccl = NcclComm::new(&mut boot, r).expect("NCCL starts");
        assert_eq!((nccl.rank(), nccl.size(), nccl.name()), (r, n, "nccl"));
        let msgs: Vec<Vec<u8>> = (0..n).map(|d| message(r, d)).collect();
        let send: Vec<u8> = msgs.concat();
        let counts: Vec<usize> = msgs.iter().map(Vec::len).collect();
        for _ in 0..2 {
            let want = boot.all_to_all_v(&send, &counts).expect("threads");
            let got = nccl.all_to_all_v(&send, &counts).expect("nccl");
            assert_eq!(got, want, "rank {r}");
            for src in 0..n {
                assert_eq!(got.from(src), message(src, r).as_slice());
            }
        }
        let nothing = nccl.all_to_all_v(&[], &vec![0; n]).expect("empty");
        assert!(nothing.is_empty() && nothing.sources() == n);
        let gathered = nccl.all_gather(&[r as u8; 3]).expect("all_gather");
        assert_eq!(gathered, boot.all_gather(&[r as u8; 3]).expect("threads"));
        let mut values: Vec<f32> = (0..1000)
            .map(|i| 0.1 * (i as f32) / (r as f32 + 1.0))
            .collect();
        let mut want = values.clone();
        nccl.all_reduce_sum(&mut values).expect("all_reduce");
        boot.all_reduce_sum(&mut want).expect("threads");
        assert_eq!(
            values.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        nccl.barrier().expect("barrier");
        assert!(
            nccl.all_to_all_v(&[0], &vec![0; n]).is_err(),
            "counts must add up"
        );
    })
    .expect("no rank panicked");
    assert_eq!(results.len(), n);
}

/// A rank that leaves (drops its communicator, which aborts it) makes the other fail with a clear error within
/// its timeout plus the abort grace, not hang; after that the communicator is spent.
#[test]
fn a_rank_that_leaves_makes_the_others_fail_in_time() {
    let Some(n) = ranks() else { return };
    let timeout = Duration::from_secs(3);
    let results = ThreadComm::run(n, |mut boot| {
        let r = boot.rank();
        let mut nccl = NcclComm::new(&mut boot, r).expect("NCCL starts");
        nccl.set_timeout(timeout);
        nccl.barrier().expect("everyone is here");
        if r == n - 1 {
            drop(nccl);
            return None;
        }
        let started = Instant::now();
        let send = vec![1u8; n * 100];
        let err = nccl
            .all_to_all_v(&send, &vec![100; n])
            .expect_err("a peer left");
        let took = started.elapsed();
        let again = nccl.barrier().expect_err("spent");
        Some((err.to_string(), took, again.to_string()))
    })
    .expect("no rank panicked");
    for (r, got) in results.into_iter().enumerate().take(n - 1) {
        let (why, took, again) = got.expect("a surviving rank");
        assert!(
            why.contains("all_to_all_v") && why.contains(&format!("rank {r}")),
            "{why}"
        );
        assert!(
            took < timeout + moe_ep::nccl::ABORT_GRACE + Duration::from_secs(2),
            "{took:?}"
        );
        assert!(again.contains("earlier failure"), "{again}");
    }
}
