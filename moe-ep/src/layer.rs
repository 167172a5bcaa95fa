//! The expert-parallel layer: each rank routes its own tokens, sends every row to its expert's owner in one
//! all-to-all (dispatch), runs the experts it owns on what it received, sends the outputs back in a second
//! all-to-all (combine), and sums them into its tokens with the backend's own combine. Each rank's tokens are its
//! own batch: rank `r`'s output is bit-identical to the single-rank layer run on rank `r`'s tokens (`docs/EP.md`).

use std::sync::Arc;
use std::time::Instant;

use ndarray::{Array2, ArrayView2};

use moe_core::{
    Backend, DeviceLayer, Expert, ExpertBank, ExpertGroups, Grad, LayerGrads, LayerOutput,
    MoeError, MoeLayer, RemoteExperts, ResidentExperts, RouterInput, Routing,
};

use crate::comm::{Communicator, comm_error};
use crate::placement::Placement;
use crate::plan::{COMBINE_HEADER_BYTES, DispatchPlan, dispatch_plan};
use crate::wire::{FAILED, Inbound, Inbox, Reader, assemble, encode_dispatch, put_rows, put_u32};

/// Options of an expert-parallel layer.
#[derive(Debug, Clone, PartialEq)]
pub struct EpOptions {
    /// Which rank owns which expert.
    pub placement: Placement,
    /// Per-rank capacity factor `c`: an owner runs at most `⌈c · S / R⌉` rows a step, where `S` is the step's
    /// slots over all ranks (its mean load is `S / R`); rows beyond it, in the order (source rank, expert,
    /// token), are dropped and contribute zero, as Megatron-LM's expert capacity drops tokens past capacity.
    /// `None` (the default) drops nothing, and the layer is then bit-identical to one rank.
    pub rank_capacity: Option<f32>,
}

impl EpOptions {
    /// Contiguous placement of `n_experts` over `ranks`, no rank capacity.
    ///
    /// # Errors
    /// As [`Placement::contiguous`].
    pub fn contiguous(n_experts: usize, ranks: usize) -> Result<Self, MoeError> {
        Ok(EpOptions {
            placement: Placement::contiguous(n_experts, ranks)?,
            rank_capacity: None,
        })
    }
}

/// What an expert-parallel layer's collectives did: bytes and messages to other ranks (a rank's rows for its own
/// experts stay local and are not counted), rows, drops and time.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EpStats {
    /// Steps (forwards, training forwards and backwards) run.
    pub steps: u64,
    /// Bytes this rank sent to other ranks in dispatch all-to-alls (headers included; [`crate::plan`]).
    pub dispatch_bytes: u64,
    /// Bytes this rank sent to other ranks in combine all-to-alls.
    pub combine_bytes: u64,
    /// Non-empty messages this rank sent to other ranks.
    pub messages: u64,
    /// Rows this rank sent to other ranks.
    pub rows_sent: u64,
    /// Rows this rank's experts ran (its own included).
    pub rows_run: u64,
    /// Rows this rank dropped as an owner past its rank capacity.
    pub dropped: u64,
    /// Milliseconds inside all-to-alls (waiting for the slowest rank included): `dispatch_ms + combine_ms`.
    pub all_to_all_ms: f64,
    /// Milliseconds inside dispatch all-to-alls (the first of a step; the failure message of a failed step).
    pub dispatch_ms: f64,
    /// Milliseconds inside combine all-to-alls.
    pub combine_ms: f64,
    /// Milliseconds running owned experts.
    pub expert_ms: f64,
}

/// An expert placeholder on a rank that does not own it: the home layer's routed bank, never run (the layer's
/// `forward_remote` hands the products to the owners).
#[derive(Debug, Clone)]
struct Elsewhere {
    d_model: usize,
    expert: usize,
    owner: usize,
}

impl Expert for Elsewhere {
    fn d_model(&self) -> usize {
        self.d_model
    }

    fn forward(&self, _x: ArrayView2<'_, f32>) -> Result<Array2<f32>, MoeError> {
        Err(MoeError::Expert {
            expert: self.expert,
            reason: format!(
                "it lives on rank {}: run the layer through its EpLayer",
                self.owner
            ),
        })
    }
}

/// What the owner keeps of one source's training batch.
#[derive(Debug, Clone)]
struct SavedBatch {
    /// The owned experts' batch number, `None` when every row was dropped or none came.
    batch: Option<usize>,
    /// Rows the source sent.
    rows: usize,
    /// Which of them ran (in order), when some were dropped.
    kept: Option<Vec<usize>>,
}

/// One rank of an expert-parallel layer. Every call is collective: all ranks call it in the same order (a rank
/// with no tokens passes `T = 0`).
pub struct EpLayer {
    home: Box<dyn DeviceLayer>,
    net: Net,
}

/// Everything of a rank but its home layer: what the remote-experts handle of a step borrows.
struct Net {
    comm: Box<dyn Communicator>,
    owned: Option<Box<dyn ResidentExperts>>,
    owned_ids: Vec<u32>,
    options: EpOptions,
    d: usize,
    stats: EpStats,
    saved: Vec<SavedBatch>,
    /// Whether this step's first all-to-all happened.
    dispatched: bool,
}

impl std::fmt::Debug for EpLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpLayer")
            .field("transport", &self.net.comm.name())
            .field("rank", &self.net.comm.rank())
            .field("size", &self.net.comm.size())
            .field("owned", &self.net.owned_ids)
            .field("options", &self.net.options)
            .finish()
    }
}

impl EpLayer {
    /// Makes this rank's part of `layer` on `backend`: its owned experts ([`ExpertBank::select`]) uploaded with
    /// [`Backend::upload_experts`], and the layer's frame (router, shared experts, output scale and bias) with
    /// placeholders for the routed experts. Collective: checks that every rank passed the same layer and options
    /// (expert count, widths, bank kind, the router's options, state and parameters, every other parameter's
    /// bits, output scale, placement, capacity) and fails on every rank naming the first rank that differs and
    /// the first field. Every rank holds the whole layer until this returns; the `EpLayer` keeps only the owned
    /// experts (drop `layer` afterwards to free the others).
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for a placement of another `E` or rank count than the layer and the
    /// communicator, a non-finite or non-positive capacity factor, and on every rank when the ranks' layers or
    /// options differ (`expert-parallel layer`); [`MoeError::Communication`] when a peer fails; upload errors (a
    /// stored or PEER bank; a backend without resident experts).
    pub fn new(
        backend: &dyn Backend,
        layer: &MoeLayer,
        options: EpOptions,
        mut comm: Box<dyn Communicator>,
    ) -> Result<Self, MoeError> {
        let (rank, size) = (comm.rank(), comm.size());
        let local = check_options(layer, &options, size);
        // Every rank takes part in the configuration check, even one whose options are wrong, so none waits.
        let fingerprint = match &local {
            Ok(()) => fingerprint(layer, &options),
            Err(e) => format!("invalid: {e}"),
        };
        let all = comm.all_gather(fingerprint.as_bytes())?;
        local?;
        for src in 0..size {
            let theirs = String::from_utf8_lossy(all.from(src));
            if theirs != fingerprint {
                return Err(MoeError::config(
                    "expert-parallel layer",
                    format!("rank {src}'s"),
                    format!(
                        "every rank must build the same layer, but rank {src}'s layer differs from rank {rank}'s: {}",
                        first_difference(&theirs, &fingerprint)
                    ),
                ));
            }
        }
        let owned_ids = options.placement.experts_of(rank);
        let d = layer.d_model();
        let owned = if owned_ids.is_empty() {
            None
        } else {
            let bank = layer.experts().select(&owned_ids)?;
            Some(backend.upload_experts(Arc::new(bank))?)
        };
        let placeholders: Vec<Box<dyn Expert>> = (0..layer.n_experts())
            .map(|e| -> Box<dyn Expert> {
                Box::new(Elsewhere {
                    d_model: d,
                    expert: e,
                    owner: options.placement.owner(e),
                })
            })
            .collect();
        let home = backend.upload(Arc::new(
            layer.with_experts(ExpertBank::Custom(placeholders))?,
        ))?;
        Ok(EpLayer {
            home,
            net: Net {
                comm,
                owned,
                owned_ids,
                options,
                d,
                stats: EpStats::default(),
                saved: Vec::new(),
                dispatched: false,
            },
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.net.comm.rank()
    }

    /// The number of ranks.
    pub fn size(&self) -> usize {
        self.net.comm.size()
    }

    /// The global ids of the experts this rank owns, ascending.
    pub fn owned_experts(&self) -> &[u32] {
        &self.net.owned_ids
    }

    /// The options the layer was made with.
    pub fn options(&self) -> &EpOptions {
        &self.net.options
    }

    /// What the collectives did so far.
    pub fn stats(&self) -> &EpStats {
        &self.net.stats
    }

    /// Gives the communicator back (to make another layer on the same ranks, or to gather results).
    pub fn into_comm(self) -> Box<dyn Communicator> {
        self.net.comm
    }

    /// The communicator (its timeout can be changed between steps).
    pub fn comm_mut(&mut self) -> &mut dyn Communicator {
        self.net.comm.as_mut()
    }

    /// The layer on this rank's tokens `input` (`[T, d]`), with the routed experts run by their owners: the output
    /// is bit-identical to the single-rank layer's forward on `input` when no rank capacity is set.
    ///
    /// # Errors
    /// As [`DeviceLayer::forward`] (on the rank whose input is bad); [`MoeError::Communication`] on the other
    /// ranks naming the rank that failed, and for a peer that left or stalled past the timeout.
    pub fn forward(&mut self, input: &RouterInput<'_>) -> Result<LayerOutput, MoeError> {
        self.step(|home, remote| home.forward_remote(input, remote))
    }

    /// The training forward ([`DeviceLayer::forward_train_remote`]): as [`EpLayer::forward`], and every rank
    /// keeps what [`EpLayer::backward`] needs.
    ///
    /// # Errors
    /// As [`EpLayer::forward`]; [`MoeError::Unsupported`] for a bank or backend without training.
    pub fn forward_train(&mut self, input: &RouterInput<'_>) -> Result<LayerOutput, MoeError> {
        self.net.saved.clear();
        self.step(|home, remote| home.forward_train_remote(input, remote))
    }

    /// The backward of the last [`EpLayer::forward_train`] (collective): `dL/dx` for this rank's tokens and the
    /// gradients of the router, shared experts and output bias, each bit-identical to the single-rank backward on
    /// this rank's tokens. The owned experts' weight gradients, summed over the sources in rank order, are in
    /// [`EpLayer::take_expert_grads`].
    ///
    /// # Errors
    /// As [`DeviceLayer::backward`]; as [`EpLayer::forward`].
    pub fn backward(
        &mut self,
        d_output: ArrayView2<'_, f32>,
        d_aux: &[f32],
    ) -> Result<LayerGrads, MoeError> {
        self.net.dispatched = false;
        let out = self
            .home
            .backward_remote(d_output, d_aux, &mut Remote { ep: &mut self.net });
        self.net.settle(out)
    }

    /// The owned experts' weight gradients of the backwards since the last call (each expert's gradient is that
    /// of its rows from every source, summed in rank order), with the global ids of the experts along the first
    /// axis ([`EpLayer::owned_experts`]). Empty on a rank that owns no expert.
    ///
    /// # Errors
    /// As [`ResidentExperts::take_grads`].
    pub fn take_expert_grads(&mut self) -> Result<Vec<Grad>, MoeError> {
        match self.net.owned.as_mut() {
            Some(o) => o.take_grads(),
            None => Ok(Vec::new()),
        }
    }

    /// Runs one collective step with the home layer detached (so the remote-experts handle can borrow the rest).
    fn step(
        &mut self,
        run: impl FnOnce(&mut dyn DeviceLayer, &mut dyn RemoteExperts) -> Result<LayerOutput, MoeError>,
    ) -> Result<LayerOutput, MoeError> {
        self.net.dispatched = false;
        let out = run(self.home.as_mut(), &mut Remote { ep: &mut self.net });
        self.net.settle(out)
    }
}

impl Net {
    /// After a step: a rank whose home layer failed before its dispatch (bad input, a routing error) still takes
    /// part in the step's first all-to-all, telling the others why, so no rank waits for it.
    fn settle<T>(&mut self, out: Result<T, MoeError>) -> Result<T, MoeError> {
        self.stats.steps += 1;
        if let Err(e) = &out
            && !self.dispatched
        {
            let m = self.failure_messages(e);
            let _ = self.exchange(m, false);
        }
        out
    }
}

fn check_options(layer: &MoeLayer, options: &EpOptions, size: usize) -> Result<(), MoeError> {
    let p = &options.placement;
    if p.n_experts() != layer.n_experts() || p.ranks() != size {
        return Err(MoeError::config(
            "placement",
            format!("{} experts on {} ranks", p.n_experts(), p.ranks()),
            format!(
                "the layer has {} experts and the communicator {size} ranks",
                layer.n_experts()
            ),
        ));
    }
    if let Some(c) = options.rank_capacity
        && !(c.is_finite() && c > 0.0)
    {
        return Err(MoeError::config(
            "rank_capacity",
            c,
            "must be finite and above 0",
        ));
    }
    Ok(())
}

/// A text every rank must agree on: the layer's shape and kinds, the router (its name, a hash of its `Debug` form,
/// which holds its options and state such as a hash table, and of its parameters' bits), a hash of every other
/// parameter's bits (routed and shared experts, output bias), the output scale, the placement and the capacity.
/// Every rank holds the whole layer when it makes its part, so the routed experts are compared too.
fn fingerprint(layer: &MoeLayer, options: &EpOptions) -> String {
    let mut h = Fnv::default();
    format!("{:?}", layer.router())
        .bytes()
        .for_each(|b| h.add(u32::from(b)));
    for p in layer.router().params() {
        p.value.iter().for_each(|v| h.add(v.to_bits()));
    }
    let router_bits = h.0;
    let mut h = Fnv::default();
    for p in layer.params() {
        if !p.name.starts_with("router.") {
            p.value.iter().for_each(|v| h.add(v.to_bits()));
        }
    }
    // Packed banks list no parameters: their bytes, scales and biases are hashed here.
    let shared = layer.shared().map(|s| s.bank());
    let mut kinds = Vec::new();
    for bank in std::iter::once(layer.experts()).chain(shared) {
        match bank {
            moe_core::ExpertBank::Packed(b) => {
                hash_packed(&mut h, b);
                kinds.push(format!("packed {}", b.format()));
            }
            other => kinds.push(other.kind().to_string()),
        }
    }
    format!(
        "experts {} | d {} | ffn {} | bank {} | router {} | router options and params {:016x} | shared {} | \
         expert, shared and output-bias params {:016x} | output scale {:?} | placement {:?} | rank capacity {:?}",
        layer.n_experts(),
        layer.d_model(),
        layer.experts().ffn(),
        kinds[0],
        layer.router().name(),
        router_bits,
        kinds.get(1).map_or("none", String::as_str),
        h.0,
        layer.output_scale(),
        options.placement.owners(),
        options.rank_capacity,
    )
}

/// Adds a packed bank's weight bytes, scales and biases to `h`.
fn hash_packed(h: &mut Fnv, b: &moe_core::PackedBank) {
    use moe_core::quant::Scales;
    for m in [b.up(), b.down()] {
        m.data()
            .chunks(4)
            .for_each(|c| h.add(c.iter().fold(0u32, |w, &x| (w << 8) | u32::from(x))));
        match m.scales() {
            Scales::None => {}
            Scales::Rows(v) | Scales::Blocks { values: v, .. } => {
                v.iter().for_each(|x| h.add(x.to_bits()));
            }
            Scales::E8m0(v) => v.iter().for_each(|&x| h.add(u32::from(x))),
        }
    }
    for bias in [b.up_bias(), b.down_bias()].into_iter().flatten() {
        bias.iter().for_each(|x| h.add(x.to_bits()));
    }
}

/// The first `|`-separated field where two fingerprints differ, both ways.
fn first_difference(theirs: &str, mine: &str) -> String {
    for (a, b) in theirs.split(" | ").zip(mine.split(" | ")) {
        if a != b {
            return format!("theirs `{a}`, this rank's `{b}`");
        }
    }
    format!("theirs `{theirs}`, this rank's `{mine}`")
}

/// FNV-1a's multiply-xor over 32-bit words.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// One 32-bit word at a time (FNV-1a's step on words rather than bytes: a fingerprint, not a checksum).
    fn add(&mut self, w: u32) {
        self.0 ^= u64::from(w);
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

/// The remote-experts handle of one step.
struct Remote<'a> {
    ep: &'a mut Net,
}

impl RemoteExperts for Remote<'_> {
    fn forward(
        &mut self,
        routing: &Routing,
        rows: ArrayView2<'_, f32>,
        train: bool,
    ) -> Result<Array2<f32>, MoeError> {
        self.ep.dispatch_forward(routing, rows, train)
    }

    fn backward(
        &mut self,
        routing: &Routing,
        d_out: ArrayView2<'_, f32>,
    ) -> Result<Array2<f32>, MoeError> {
        self.ep.dispatch_backward(routing, d_out)
    }
}

impl Net {
    fn timed<T>(
        &mut self,
        combine: bool,
        f: impl FnOnce(&mut dyn Communicator) -> Result<T, MoeError>,
    ) -> Result<T, MoeError> {
        let t0 = Instant::now();
        let out = f(self.comm.as_mut());
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        self.stats.all_to_all_ms += ms;
        if combine {
            self.stats.combine_ms += ms;
        } else {
            self.stats.dispatch_ms += ms;
        }
        out
    }

    /// Sends `messages[dst]` to every rank (counting what leaves this rank) and returns what came.
    /// A rank's message to itself never enters the communicator (no copy through the transport): it is handed
    /// back beside what the others sent.
    fn exchange(&mut self, mut messages: Vec<Vec<u8>>, combine: bool) -> Result<Inbox, MoeError> {
        let rank = self.comm.rank();
        let own = std::mem::take(&mut messages[rank]);
        let counts: Vec<usize> = messages.iter().map(Vec::len).collect();
        for (dst, m) in messages.iter().enumerate() {
            if dst != rank && !m.is_empty() {
                self.stats.messages += 1;
                if combine {
                    self.stats.combine_bytes += m.len() as u64;
                } else {
                    self.stats.dispatch_bytes += m.len() as u64;
                }
            }
        }
        let send: Vec<u8> = messages.concat();
        self.dispatched = true;
        let got = self.timed(combine, |c| c.all_to_all_v(&send, &counts))?;
        Ok(Inbox { got, own, rank })
    }

    /// The error of the first source whose message says it failed.
    fn failed_source(&self, got: &Inbox, op: &'static str) -> Option<MoeError> {
        (0..got.sources()).find_map(|src| {
            let b = got.from(src);
            (b.len() >= 4 && b[..4] == FAILED.to_le_bytes()).then(|| {
                Reader {
                    bytes: b,
                    at: 4,
                    src,
                    rank: self.comm.rank(),
                    op,
                }
                .failure()
            })
        })
    }

    /// A failed step's message to every rank.
    fn failure_messages(&self, e: &MoeError) -> Vec<Vec<u8>> {
        let mut m = Vec::new();
        put_u32(&mut m, FAILED);
        m.extend_from_slice(e.to_string().as_bytes());
        vec![m; self.comm.size()]
    }

    fn dispatch_forward(
        &mut self,
        routing: &Routing,
        rows: ArrayView2<'_, f32>,
        train: bool,
    ) -> Result<Array2<f32>, MoeError> {
        let d = self.d;
        let plan = dispatch_plan(routing, &self.options.placement);
        let x = rows.as_standard_layout();
        let xs = x.as_slice().unwrap_or(&[]);
        let always = self.options.rank_capacity.is_some();
        let messages: Vec<Vec<u8>> = (0..self.comm.size())
            .map(|o| encode_dispatch(&plan, o, routing.offsets(), xs, d, always))
            .collect();
        let rank = self.comm.rank();
        self.stats.rows_sent += plan
            .owners
            .iter()
            .enumerate()
            .filter(|&(o, _)| o != rank)
            .map(|(_, g)| g.rows() as u64)
            .sum::<u64>();
        let got = self.exchange(messages, false)?;
        // A rank that failed before its dispatch told every rank so: all stop here, before the combine.
        if let Some(e) = self.failed_source(&got, "dispatch") {
            return Err(e);
        }
        let decoded = (0..got.sources())
            .map(|src| self.decode_dispatch(got.from(src), src))
            .collect::<Result<Vec<_>, _>>();
        let answers = decoded.and_then(|inbound| self.run_owned(&inbound, train));
        self.combine(answers, &plan, routing.offsets())
    }

    fn decode_dispatch(&self, bytes: &[u8], src: usize) -> Result<Option<Inbound>, MoeError> {
        if bytes.is_empty() {
            return Ok(None);
        }
        let mut r = Reader {
            bytes,
            at: 0,
            src,
            rank: self.comm.rank(),
            op: "dispatch",
        };
        let groups = r.u32()?;
        let plan_max_rows = r.u32()? as usize;
        let source_slots = r.u32()? as usize;
        let n_owned = self.owned_ids.len();
        let mut experts = Vec::new();
        let mut offsets = vec![0usize];
        for _ in 0..groups {
            let e = r.u32()?;
            let n = r.u32()? as usize;
            if e as usize >= n_owned {
                return Err(comm_error(
                    "dispatch",
                    self.comm.rank(),
                    format!("rank {src} sent rows for local expert {e}; this rank owns {n_owned}"),
                ));
            }
            experts.push(e);
            let last = offsets[offsets.len() - 1];
            offsets.push(last + n);
        }
        let n_rows = offsets[offsets.len() - 1];
        let rows = r.rows(n_rows, self.d)?;
        r.done()?;
        Ok(Some(Inbound {
            experts,
            offsets,
            plan_max_rows,
            source_slots,
            rows,
        }))
    }

    /// Runs the owned experts on every source's rows (in source rank order) and encodes the answers.
    fn run_owned(
        &mut self,
        inbound: &[Option<Inbound>],
        train: bool,
    ) -> Result<Vec<Vec<u8>>, MoeError> {
        let total: usize = inbound.iter().flatten().map(|i| i.source_slots).sum();
        let mut budget = self
            .options
            .rank_capacity
            .map(|c| (f64::from(c) * total as f64 / self.comm.size() as f64).ceil() as usize);
        let mut answers = Vec::with_capacity(inbound.len());
        for msg in inbound {
            let Some(msg) = msg else {
                answers.push(Vec::new());
                if train {
                    self.saved.push(SavedBatch {
                        batch: None,
                        rows: 0,
                        kept: None,
                    });
                }
                continue;
            };
            let n = msg.rows.nrows();
            let keep = budget.map(|b| b.min(n));
            if let Some(b) = budget.as_mut() {
                *b -= keep.unwrap_or(0);
            }
            let (kept, groups_e, groups_o) = match keep {
                Some(k) if k < n => {
                    // The first k rows in (expert, token) order run; the rest are dropped.
                    let mut e2 = Vec::new();
                    let mut o2 = vec![0usize];
                    for (g, &e) in msg.experts.iter().enumerate() {
                        let end = msg.offsets[g + 1].min(k);
                        let start = msg.offsets[g].min(k);
                        if end > start {
                            e2.push(e);
                            o2.push(o2[o2.len() - 1] + end - start);
                        }
                    }
                    (Some((0..k).collect::<Vec<_>>()), e2, o2)
                }
                _ => (None, msg.experts.clone(), msg.offsets.clone()),
            };
            let n_run = groups_o[groups_o.len() - 1];
            let dropped = n - n_run;
            self.stats.dropped += dropped as u64;
            self.stats.rows_run += n_run as u64;
            let x = msg.rows.slice(ndarray::s![..n_run, ..]);
            let groups = ExpertGroups {
                experts: &groups_e,
                offsets: &groups_o,
                plan_max_rows: msg.plan_max_rows,
            };
            let t0 = Instant::now();
            let (batch, y) = if n_run == 0 {
                (None, Array2::zeros((0, self.d)))
            } else {
                let owned = self.owned.as_mut().ok_or_else(|| {
                    comm_error("dispatch", 0, "rows came for a rank that owns no expert")
                })?;
                if train {
                    let (b, y) = owned.forward_train(&groups, x)?;
                    (Some(b), y)
                } else {
                    (None, owned.forward(&groups, x)?)
                }
            };
            self.stats.expert_ms += t0.elapsed().as_secs_f64() * 1e3;
            if train {
                self.saved.push(SavedBatch {
                    batch,
                    rows: n,
                    kept: kept.clone(),
                });
            }
            let mut m = Vec::with_capacity(COMBINE_HEADER_BYTES + 4 * dropped + 4 * y.len());
            put_u32(&mut m, dropped as u32);
            for i in n_run..n {
                put_u32(&mut m, i as u32);
            }
            put_rows(&mut m, y.as_standard_layout().as_slice().unwrap_or(&[]));
            answers.push(m);
        }
        Ok(answers)
    }

    fn dispatch_backward(
        &mut self,
        routing: &Routing,
        d_out: ArrayView2<'_, f32>,
    ) -> Result<Array2<f32>, MoeError> {
        let d = self.d;
        let plan = dispatch_plan(routing, &self.options.placement);
        let g = d_out.as_standard_layout();
        let gs = g.as_slice().unwrap_or(&[]);
        let offsets = routing.offsets();
        let messages: Vec<Vec<u8>> = plan
            .owners
            .iter()
            .map(|o| {
                let mut m = Vec::new();
                if o.rows() > 0 {
                    put_u32(&mut m, 0);
                    for &pg in &o.plan_groups {
                        put_rows(&mut m, &gs[offsets[pg] * d..offsets[pg + 1] * d]);
                    }
                }
                m
            })
            .collect();
        let got = self.exchange(messages, false)?;
        if let Some(e) = self.failed_source(&got, "dispatch (backward)") {
            return Err(e);
        }
        let answers = self.backward_owned(&got);
        self.combine(answers, &plan, offsets)
    }

    /// The combine all-to-all: the owners' answers (or, when this rank failed as an owner, its failure, so every
    /// rank stops here) and the outputs put back in the plan's slot order.
    fn combine(
        &mut self,
        answers: Result<Vec<Vec<u8>>, MoeError>,
        plan: &DispatchPlan,
        offsets: &[usize],
    ) -> Result<Array2<f32>, MoeError> {
        let answers = match answers {
            Ok(a) => a,
            Err(e) => {
                let m = self.failure_messages(&e);
                let _ = self.exchange(m, true);
                return Err(e);
            }
        };
        let back = self.exchange(answers, true)?;
        assemble(plan, &back, offsets, self.d, self.comm.rank())
    }

    /// The owner's backward of every source's saved batch, in source rank order (so each expert's weight gradient
    /// is the sum of the sources' in rank order), encoded as combine answers.
    fn backward_owned(&mut self, got: &Inbox) -> Result<Vec<Vec<u8>>, MoeError> {
        let rank = self.comm.rank();
        if self.saved.len() != got.sources() {
            return Err(MoeError::Order {
                call: "expert-parallel backward".into(),
                before: "a training forward (forward_train) on every rank".into(),
            });
        }
        let d = self.d;
        let mut answers = Vec::with_capacity(got.sources());
        for src in 0..got.sources() {
            let saved = self.saved[src].clone();
            let bytes = got.from(src);
            if bytes.is_empty() {
                if saved.rows > 0 {
                    return Err(comm_error(
                        "dispatch (backward)",
                        rank,
                        format!("rank {src} sent no gradients for {} rows", saved.rows),
                    ));
                }
                answers.push(Vec::new());
                continue;
            }
            let mut r = Reader {
                bytes,
                at: 4,
                src,
                rank,
                op: "dispatch (backward)",
            };
            let dy = r.rows(saved.rows, d)?;
            r.done()?;
            let kept = saved
                .kept
                .clone()
                .unwrap_or_else(|| (0..saved.rows).collect());
            let dx = match saved.batch {
                Some(b) => {
                    let owned = self.owned.as_mut().ok_or_else(|| {
                        comm_error("dispatch (backward)", rank, "no owned experts")
                    })?;
                    let dyk = dy.select(ndarray::Axis(0), &kept);
                    let t0 = Instant::now();
                    let dx = owned.backward(b, dyk.view())?;
                    self.stats.expert_ms += t0.elapsed().as_secs_f64() * 1e3;
                    dx
                }
                None => Array2::zeros((0, d)),
            };
            let dropped = saved.rows - dx.nrows();
            let mut m = Vec::with_capacity(COMBINE_HEADER_BYTES + 4 * dropped + 4 * dx.len());
            put_u32(&mut m, dropped as u32);
            let mut is_kept = vec![false; saved.rows];
            kept.iter().for_each(|&i| is_kept[i] = true);
            for (i, _) in is_kept.iter().enumerate().filter(|(_, k)| !**k) {
                put_u32(&mut m, i as u32);
            }
            put_rows(&mut m, dx.as_standard_layout().as_slice().unwrap_or(&[]));
            answers.push(m);
        }
        Ok(answers)
    }
}
