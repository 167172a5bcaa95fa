//! Routing traces: per step and layer, the experts each token used (and, optionally, the experts predicted for
//! that layer before it ran), in a compact binary format. `moe route --trace` and `moe train --trace` write them;
//! `moe cache-sim` replays them through the same [`SlotCache`](super::cache::SlotCache) a live store uses.
//!
//! ## File format (`.moetrace`, version 1, all integers little-endian)
//! ```text
//! b"MOETRACE"  u32 version = 1  u32 header_len  header_len bytes of JSON (TraceHeader)
//! then, for each step, for each of the header's n_layers layers, one layer record:
//!   u32 T                      tokens of the step
//!   u8  flags                  bit 0: a predicted CSR follows the used one
//!   CSR (used):      T × u16 expert counts, then the ids of every token in order
//!   CSR (predicted): the same, when flag bit 0 is set
//! ids are u8 when E <= 256, u16 when E <= 65,536, else u32
//! ```
//! A token's ids are distinct and ascending; padding tokens and dropped assignments have none. Every layer of a
//! step has the same T. The file ends after the last step's last layer.

use crate::error::MoeError;
use crate::routing::Routing;

/// The magic bytes a trace file starts with.
pub const MAGIC: &[u8; 8] = b"MOETRACE";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Largest header JSON accepted (1 MiB).
const MAX_HEADER: usize = 1 << 20;
/// Most experts per layer a trace may name (2²⁰, the CLI's `--experts` limit; PEER's singletons fit).
pub const MAX_EXPERTS: usize = 1 << 20;
/// Most layers a trace may hold.
pub const MAX_LAYERS: usize = 1 << 12;
/// Most (layer, expert) pairs, `L · E`: what per-expert tables of a replay hold (2²⁴, 128 MiB of counters).
pub const MAX_LAYER_EXPERTS: usize = 1 << 24;

/// What a trace is of (the JSON header of the file).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceHeader {
    /// Layers `L` (at least 1).
    pub n_layers: usize,
    /// Experts `E` of every layer (at least 1).
    pub n_experts: usize,
    /// The router's `k` (informational: expert choice gives tokens other counts).
    pub top_k: usize,
    /// Bytes of one expert at its stored dtype, for "bytes moved" (0: unknown).
    pub expert_bytes: u64,
    /// What produced the trace (`moe train charlm softmax-topk d128 L4 E8 k2 seed 1, validation set`).
    pub model: String,
    /// The router's name.
    pub router: String,
}

/// One layer of one step: the experts each token used (token-major CSR) and, optionally, the experts predicted
/// for this layer before it ran (the next-layer gate applied to the previous layer's input), in the same form.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LayerRecord {
    /// `[T + 1]`, starting at 0: token `t`'s experts are `experts[offsets[t]..offsets[t + 1]]`.
    pub offsets: Vec<u32>,
    /// Per token, distinct ascending expert ids `< E`.
    pub experts: Vec<u32>,
    /// The predicted experts as `(offsets [T + 1], experts)`.
    pub predicted: Option<(Vec<u32>, Vec<u32>)>,
}

/// `(offsets, experts)` of a plan's kept assignments, token-major, ascending expert id per token.
fn csr_of(routing: &Routing) -> (Vec<u32>, Vec<u32>) {
    let (offsets, slots) = routing.token_slots();
    let slot_experts = routing.slot_experts();
    let mut ids = Vec::with_capacity(slots.len());
    let mut offs = Vec::with_capacity(offsets.len());
    offs.push(0u32);
    for w in offsets.windows(2) {
        let start = ids.len();
        ids.extend(slots[w[0]..w[1]].iter().map(|&s| slot_experts[s]));
        ids[start..].sort_unstable();
        offs.push(ids.len() as u32);
    }
    if offsets.len() < 2 {
        offs.truncate(1);
    }
    (offs, ids)
}

impl LayerRecord {
    /// The kept assignments of `routing` (drops excluded; padding tokens have none).
    pub fn from_routing(routing: &Routing) -> Self {
        let (offsets, experts) = csr_of(routing);
        LayerRecord {
            offsets,
            experts,
            predicted: None,
        }
    }

    /// Adds the experts `predicted` chose for the same tokens.
    ///
    /// # Errors
    /// [`MoeError::Mismatch`] when the two plans have different token counts.
    pub fn with_predicted(mut self, predicted: &Routing) -> Result<Self, MoeError> {
        if predicted.n_tokens() != self.n_tokens() {
            return Err(MoeError::mismatch(
                "trace record",
                "used tokens",
                self.n_tokens(),
                "predicted tokens",
                predicted.n_tokens(),
            ));
        }
        self.predicted = Some(csr_of(predicted));
        Ok(self)
    }

    /// Tokens `T`.
    pub fn n_tokens(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// The experts token `t` used (empty for `t >= T`).
    pub fn token(&self, t: usize) -> &[u32] {
        csr_row(&self.offsets, &self.experts, t)
    }

    /// The experts predicted for token `t` (empty without a prediction).
    pub fn predicted_token(&self, t: usize) -> &[u32] {
        match &self.predicted {
            Some((o, e)) => csr_row(o, e, t),
            None => &[],
        }
    }
}

fn csr_row<'a>(offsets: &[u32], ids: &'a [u32], t: usize) -> &'a [u32] {
    match (offsets.get(t), offsets.get(t + 1)) {
        (Some(&a), Some(&b)) => ids.get(a as usize..b as usize).unwrap_or(&[]),
        _ => &[],
    }
}

/// Checks one CSR: offsets start at 0, ascend, end at `ids.len()`; each token's ids distinct ascending `< e`.
fn check_csr(what: &str, offsets: &[u32], ids: &[u32], e: usize) -> Result<(), MoeError> {
    let bad = |why: String| MoeError::config("routing trace", what, why);
    if offsets.first() != Some(&0) || offsets.last().map(|&o| o as usize) != Some(ids.len()) {
        return Err(bad(
            "offsets must start at 0 and end at the number of ids".into()
        ));
    }
    for (t, w) in offsets.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(bad(format!("offsets descend at token {t}")));
        }
        let row = &ids[w[0] as usize..w[1] as usize];
        if row.windows(2).any(|p| p[1] <= p[0]) || row.iter().any(|&x| x as usize >= e) {
            return Err(bad(format!(
                "token {t} has experts {row:?}: want distinct ascending ids below E = {e}"
            )));
        }
    }
    Ok(())
}

/// A routing trace: a header and, per step, one [`LayerRecord`] per layer.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingTrace {
    header: TraceHeader,
    steps: Vec<Vec<LayerRecord>>,
}

impl RoutingTrace {
    /// An empty trace.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for zero layers or experts, or more than [`MAX_LAYERS`] layers, [`MAX_EXPERTS`]
    /// experts or [`MAX_LAYER_EXPERTS`] (layer, expert) pairs: a replay allocates per-expert tables, so a header
    /// cannot ask for absurd memory.
    pub fn new(header: TraceHeader) -> Result<Self, MoeError> {
        let (l, e) = (header.n_layers, header.n_experts);
        if l == 0 || e == 0 || l > MAX_LAYERS || e > MAX_EXPERTS || l * e > MAX_LAYER_EXPERTS {
            return Err(MoeError::config(
                "routing trace header",
                format!("{l} layers of {e} experts"),
                format!(
                    "1 to {MAX_LAYERS} layers of 1 to {MAX_EXPERTS} experts, at most {MAX_LAYER_EXPERTS} (layer, expert) pairs"
                ),
            ));
        }
        Ok(RoutingTrace {
            header,
            steps: Vec::new(),
        })
    }

    /// Appends a step: one record per layer, every layer with the same `T`.
    ///
    /// # Errors
    /// [`MoeError::Mismatch`] for another layer count or token counts that differ; [`MoeError::InvalidConfig`]
    /// for a malformed CSR or an expert id `>= E`.
    pub fn push_step(&mut self, layers: Vec<LayerRecord>) -> Result<(), MoeError> {
        if layers.len() != self.header.n_layers {
            return Err(MoeError::mismatch(
                "trace step",
                "layers in the step",
                layers.len(),
                "layers in the header",
                self.header.n_layers,
            ));
        }
        let t0 = layers.first().map_or(0, LayerRecord::n_tokens);
        for (l, r) in layers.iter().enumerate() {
            if r.n_tokens() != t0 || r.offsets.is_empty() {
                return Err(MoeError::mismatch(
                    "trace step",
                    format!("tokens of layer {l}"),
                    r.n_tokens(),
                    "tokens of layer 0",
                    t0,
                ));
            }
            check_csr(
                &format!("layer {l} used"),
                &r.offsets,
                &r.experts,
                self.header.n_experts,
            )?;
            if let Some((o, e)) = &r.predicted {
                if o.len() != r.offsets.len() {
                    return Err(MoeError::mismatch(
                        "trace step",
                        format!("predicted tokens of layer {l}"),
                        o.len().saturating_sub(1),
                        "used tokens",
                        t0,
                    ));
                }
                check_csr(&format!("layer {l} predicted"), o, e, self.header.n_experts)?;
            }
        }
        self.steps.push(layers);
        Ok(())
    }

    /// The header.
    pub fn header(&self) -> &TraceHeader {
        &self.header
    }

    /// The steps, each one record per layer.
    pub fn steps(&self) -> &[Vec<LayerRecord>] {
        &self.steps
    }

    /// Refuses a trace of another model: its layer or expert count differs from the given one.
    ///
    /// # Errors
    /// [`MoeError::Mismatch`] naming both values.
    pub fn check_matches(&self, n_layers: usize, n_experts: usize) -> Result<(), MoeError> {
        if self.header.n_experts != n_experts {
            return Err(MoeError::mismatch(
                "routing trace from another model",
                "trace experts E",
                self.header.n_experts,
                "model experts E",
                n_experts,
            ));
        }
        if self.header.n_layers != n_layers {
            return Err(MoeError::mismatch(
                "routing trace from another model",
                "trace layers",
                self.header.n_layers,
                "model layers",
                n_layers,
            ));
        }
        Ok(())
    }

    /// Bytes per expert id in the file: 1, 2 or 4 by `E`.
    fn id_width(&self) -> usize {
        id_width(self.header.n_experts)
    }

    /// The trace in the file format of the module docs.
    pub fn to_bytes(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&self.header).unwrap_or_default();
        let mut out = Vec::with_capacity(16 + header.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        let w = self.id_width();
        for step in &self.steps {
            for r in step {
                out.extend_from_slice(&(r.n_tokens() as u32).to_le_bytes());
                out.push(u8::from(r.predicted.is_some()));
                write_csr(&mut out, &r.offsets, &r.experts, w);
                if let Some((o, e)) = &r.predicted {
                    write_csr(&mut out, o, e, w);
                }
            }
        }
        out
    }

    /// Parses the file format of the module docs. Never panics; allocates no more than the input can hold.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] naming what is wrong (magic, version, header, a truncated record, an id `>= E`,
    /// a token with more than `E` experts).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MoeError> {
        let mut r = Reader { b: bytes, at: 0 };
        if r.take(8)? != MAGIC {
            return Err(bad_file(
                "it does not start with MOETRACE (not a routing trace)",
            ));
        }
        let version = r.u32()?;
        if version != VERSION {
            return Err(bad_file(&format!(
                "version {version}; this build reads version {VERSION}"
            )));
        }
        let hlen = r.u32()? as usize;
        if hlen > MAX_HEADER {
            return Err(bad_file(&format!(
                "a header of {hlen} bytes (at most {MAX_HEADER})"
            )));
        }
        let header: TraceHeader = serde_json::from_slice(r.take(hlen)?)
            .map_err(|e| bad_file(&format!("header JSON: {e}")))?;
        let mut trace = RoutingTrace::new(header)?;
        let w = trace.id_width();
        while r.at < bytes.len() {
            let mut layers = Vec::with_capacity(trace.header.n_layers.min(1024));
            for _ in 0..trace.header.n_layers {
                let t = r.u32()? as usize;
                let flags = r.u8()?;
                if flags > 1 {
                    return Err(bad_file(&format!("record flags {flags}")));
                }
                let (offsets, experts) = r.csr(t, w, trace.header.n_experts)?;
                let predicted = if flags == 1 {
                    Some(r.csr(t, w, trace.header.n_experts)?)
                } else {
                    None
                };
                layers.push(LayerRecord {
                    offsets,
                    experts,
                    predicted,
                });
            }
            trace.push_step(layers)?;
        }
        Ok(trace)
    }
}

fn id_width(e: usize) -> usize {
    if e <= 1 << 8 {
        1
    } else if e <= 1 << 16 {
        2
    } else {
        4
    }
}

fn write_csr(out: &mut Vec<u8>, offsets: &[u32], ids: &[u32], w: usize) {
    for p in offsets.windows(2) {
        out.extend_from_slice(&((p[1] - p[0]) as u16).to_le_bytes());
    }
    for &id in ids {
        match w {
            1 => out.push(id as u8),
            2 => out.extend_from_slice(&(id as u16).to_le_bytes()),
            _ => out.extend_from_slice(&id.to_le_bytes()),
        }
    }
}

fn bad_file(why: &str) -> MoeError {
    MoeError::config("routing trace", "the file", why)
}

/// A bounds-checked little-endian reader.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MoeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| {
                bad_file(&format!(
                    "truncated at byte {} (wanted {n} more bytes, {} left)",
                    self.at,
                    self.b.len() - self.at
                ))
            })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, MoeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, MoeError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    /// One CSR of `t` tokens with ids of `w` bytes below `e`; the counts are read before anything is allocated.
    fn csr(&mut self, t: usize, w: usize, e: usize) -> Result<(Vec<u32>, Vec<u32>), MoeError> {
        let counts = self.take(
            t.checked_mul(2)
                .ok_or_else(|| bad_file("token count overflows"))?,
        )?;
        let mut offsets = Vec::with_capacity(t + 1);
        offsets.push(0u32);
        let mut total = 0usize;
        for c in counts.chunks_exact(2) {
            let n = u16::from_le_bytes([c[0], c[1]]) as usize;
            if n > e {
                return Err(bad_file(&format!("a token with {n} experts (E = {e})")));
            }
            total += n;
            offsets.push(total as u32);
        }
        let raw = self.take(
            total
                .checked_mul(w)
                .ok_or_else(|| bad_file("id count overflows"))?,
        )?;
        let ids: Vec<u32> = match w {
            1 => raw.iter().map(|&x| u32::from(x)).collect(),
            2 => raw
                .chunks_exact(2)
                .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            _ => raw
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        };
        Ok((offsets, ids))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::Assignment;

    fn header(l: usize, e: usize) -> TraceHeader {
        TraceHeader {
            n_layers: l,
            n_experts: e,
            top_k: 2,
            expert_bytes: 64,
            model: "test".into(),
            router: "softmax-topk".into(),
        }
    }

    fn plan(t: usize, e: usize, pairs: &[(u32, u32)]) -> Routing {
        let kept = pairs
            .iter()
            .map(|&(token, expert)| Assignment {
                token,
                expert,
                weight: 0.5,
                rank: 0,
            })
            .collect();
        Routing::new(t, e, t, kept, Vec::new()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn round_trips_every_id_width_and_refuses_bad_bytes() {
        for e in [8usize, 300, 70_000] {
            let top = (e - 1) as u32;
            let used = plan(3, e, &[(0, top), (0, 1), (2, 0)]);
            let pred = plan(3, e, &[(1, 2), (2, top)]);
            let r0 = LayerRecord::from_routing(&used);
            assert_eq!(
                (r0.token(0), r0.token(1), r0.token(2)),
                (&[1, top][..], &[][..], &[0][..])
            );
            let r1 = LayerRecord::from_routing(&pred)
                .with_predicted(&used)
                .unwrap_or_else(|e| panic!("{e}"));
            let mut tr = RoutingTrace::new(header(2, e)).unwrap_or_else(|e| panic!("{e}"));
            tr.push_step(vec![r0.clone(), r1.clone()])
                .unwrap_or_else(|e| panic!("{e}"));
            tr.push_step(vec![r1, r0]).unwrap_or_else(|e| panic!("{e}"));
            let bytes = tr.to_bytes();
            assert_eq!(RoutingTrace::from_bytes(&bytes), Ok(tr.clone()));
            // A truncation is an error, or (cut at a step boundary) the steps before it; never a panic.
            for cut in 0..bytes.len() {
                if let Ok(t) = RoutingTrace::from_bytes(&bytes[..cut]) {
                    assert!(
                        t.steps().len() < 2 && tr.steps().starts_with(t.steps()),
                        "cut {cut}"
                    );
                }
            }
        }
        assert!(RoutingTrace::from_bytes(b"NOTATRACE.......").is_err());
        let mut tr = RoutingTrace::new(header(1, 4)).unwrap_or_else(|e| panic!("{e}"));
        tr.push_step(vec![LayerRecord::from_routing(&plan(1, 4, &[(0, 3)]))])
            .unwrap_or_else(|e| panic!("{e}"));
        let mut bytes = tr.to_bytes();
        let last = bytes.len() - 1;
        bytes[last] = 9; // expert 9 >= E = 4
        assert!(RoutingTrace::from_bytes(&bytes).is_err());
        // A huge token count with nothing behind it is refused before allocating.
        let mut bytes = RoutingTrace::new(header(1, 4))
            .unwrap_or_else(|e| panic!("{e}"))
            .to_bytes();
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.push(0);
        assert!(RoutingTrace::from_bytes(&bytes).is_err());
    }

    #[test]
    fn refuses_steps_of_another_shape_and_traces_of_another_model() {
        let mut tr = RoutingTrace::new(header(2, 4)).unwrap_or_else(|e| panic!("{e}"));
        let r = LayerRecord::from_routing(&plan(2, 4, &[(0, 1)]));
        assert!(tr.push_step(vec![r.clone()]).is_err());
        let r3 = LayerRecord::from_routing(&plan(3, 4, &[(0, 1)]));
        assert!(tr.push_step(vec![r.clone(), r3]).is_err());
        let bad = LayerRecord {
            offsets: vec![0, 2],
            experts: vec![2, 1],
            predicted: None,
        };
        assert!(tr.push_step(vec![r.clone(), bad]).is_err());
        assert!(tr.push_step(vec![r.clone(), r]).is_ok());
        assert!(tr.check_matches(2, 4).is_ok());
        assert!(tr.check_matches(2, 8).is_err());
        assert!(tr.check_matches(3, 4).is_err());
        assert!(RoutingTrace::new(header(0, 4)).is_err());
    }

    #[test]
    fn headers_asking_for_absurd_tables_are_refused_before_allocating() {
        for (l, e) in [
            (1, 1 << 31),
            (1, MAX_EXPERTS + 1),
            (MAX_LAYERS + 1, 2),
            (17, MAX_EXPERTS),
        ] {
            assert!(RoutingTrace::new(header(l, e)).is_err(), "{l} x {e}");
            // The same header in a file: refused by the parser too.
            let json = serde_json::to_vec(&header(l, e)).unwrap_or_default();
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&VERSION.to_le_bytes());
            bytes.extend_from_slice(&(json.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&json);
            assert!(RoutingTrace::from_bytes(&bytes).is_err(), "{l} x {e}");
        }
        assert!(RoutingTrace::new(header(16, MAX_EXPERTS)).is_ok());
    }
}
