//! One case on a backend: the forward of the preset's layer, and each reference checked against it (on the backend
//! or on the host, as the crate docs list).

use std::cell::OnceCell;
use std::sync::Arc;

use moe_backends::cpu::expert_forward;
use moe_core::{AuxLossKind, Backend, LayerOutput, MoeError, MoeLayer, RouterInput, Routing};
use moe_models::LoadError;
use moe_models::fixture::FixtureCase;
use ndarray::Axis;

use crate::Side;
use crate::compare::{Compare, dropped_tokens, kept_dense, kept_mask, softmax_rows};

/// A case on a backend: what a forward needs.
struct Case<'a> {
    fx: &'a FixtureCase,
    name: &'a str,
    backend: &'a dyn Backend,
    seq_lens: Vec<usize>,
}

impl Case<'_> {
    fn input(&self) -> RouterInput<'_> {
        RouterInput::new(self.fx.input.view()).with_seq_lens(&self.seq_lens)
    }

    fn err(&self, e: MoeError) -> LoadError {
        LoadError::layer(&self.fx.path, format!("running case {}", self.name), e)
    }

    /// Uploads `layer` to the backend and runs one forward on the case's input.
    fn forward(&self, layer: MoeLayer) -> Result<LayerOutput, LoadError> {
        let mut dev = self
            .backend
            .upload(Arc::new(layer))
            .map_err(|e| self.err(e))?;
        dev.forward(&self.input()).map_err(|e| self.err(e))
    }
}

/// A case's layer run once on a backend, with what the references are compared against.
pub(crate) struct Run<'a> {
    case: Case<'a>,
    /// The forward of the whole layer on the backend.
    out: LayerOutput,
    /// The router's plan computed on the host, made when a reference needs what the backend's plan lacks.
    host: OnceCell<Routing>,
}

impl<'a> Run<'a> {
    /// Uploads the case's layer to `backend` and runs it on the case's input.
    pub(crate) fn new(
        fx: &'a FixtureCase,
        name: &'a str,
        backend: &'a dyn Backend,
    ) -> Result<Self, LoadError> {
        let case = Case {
            fx,
            name,
            backend,
            seq_lens: fx.seq_lens(),
        };
        let out = case.forward(fx.layer.clone())?;
        Ok(Run {
            case,
            out,
            host: OnceCell::new(),
        })
    }

    /// The routed part alone: the layer without its shared experts (same router, experts and output scale),
    /// uploaded and run on the backend.
    fn routed_output(&self) -> Result<ndarray::Array2<f32>, LoadError> {
        let c = &self.case;
        let layer = &c.fx.layer;
        let router = layer.clone().router_mut().clone();
        let routed = MoeLayer::new(router, layer.experts().clone())
            .and_then(|l| l.with_output_scale(layer.output_scale()))
            .map_err(|e| c.err(e))?;
        Ok(c.forward(routed)?.output)
    }

    /// The aux loss `which` picks: from the backend's plan, else from the router run on the host.
    fn aux(&self, which: impl Fn(&AuxLossKind) -> bool) -> Result<Option<(f32, Side)>, LoadError> {
        let find = |r: &Routing| {
            r.aux_losses()
                .iter()
                .find(|a| which(&a.kind))
                .map(|a| a.value)
        };
        if let Some(v) = find(&self.out.routing) {
            return Ok(Some((v, Side::Backend)));
        }
        let host = match self.host.get() {
            Some(h) => h,
            None => {
                let c = &self.case;
                let r = c.fx.layer.route(&c.input()).map_err(|e| c.err(e))?;
                self.host.get_or_init(|| r)
            }
        };
        Ok(find(host).map(|v| (v, Side::Host)))
    }

    /// Compares reference `ref_name` (`ref.output`, ...) of the case, or records why it is skipped.
    pub(crate) fn check(&self, rep: &mut Compare<'_>, ref_name: &str) -> Result<(), LoadError> {
        let short = ref_name.trim_start_matches("ref.");
        let routing = &self.out.routing;
        let on = Side::Backend;
        match short {
            "input" | "topk_weights" => {}
            // Compared by `grad::check`, after the forward references.
            g if crate::grad::is_gradient_reference(g) => {}
            "output" => rep.dense(short, self.out.output.view(), on)?,
            "routed_output" => rep.dense(short, self.routed_output()?.view(), on)?,
            "router_logits" | "router_probs" => match routing.logits() {
                Some(l) if short == "router_logits" => rep.dense(short, l.view(), on)?,
                Some(l) => rep.dense(short, softmax_rows(l.view()).view(), on)?,
                None => rep.skip(short, "the router keeps no logits"),
            },
            "topk_indices" => rep.topk(routing, on)?,
            "shared_expert_output" | "shared_expert_gate_logit" => self.shared(rep, short)?,
            "aux.lb_loss" | "aux.z_loss" => {
                let z = short == "aux.z_loss";
                let picked = self.aux(|k| match k {
                    AuxLossKind::LoadBalance(_) => !z,
                    AuxLossKind::RouterZ => z,
                    _ => false,
                })?;
                match picked {
                    Some((v, side)) => rep.scalar(short, v, side)?,
                    None => rep.skip(short, "the router reports no such loss"),
                }
            }
            "dropped" => rep.discrete(short, &dropped_tokens(routing), on)?,
            "dispatch_mask" | "top1_mask" => {
                rep.discrete(short, &kept_mask(routing, short == "top1_mask"), on)?;
            }
            "combine_weights" => rep.dense(short, kept_dense(routing).view(), on)?,
            "jetmoe.expert_size" => {
                let counts = routing.expert_counts();
                let ours: Vec<i64> = counts.iter().map(|&c| c as i64).collect();
                rep.discrete(short, &ours, on)?;
            }
            "output_hf_v5_buggy" => rep.skip(short, "transformers 5.23 dispatch bug, not a target"),
            "aux.lb_loss_v4_convention" => rep.skip(
                short,
                "transformers v4 convention (dropped tokens count as expert 0)",
            ),
            other => rep.skip(other, "not compared"),
        }
        Ok(())
    }

    /// The shared expert's output (CPU expert forward) or its gate logit `x · w`, both on the host.
    fn shared(&self, rep: &mut Compare<'_>, short: &str) -> Result<(), LoadError> {
        let c = &self.case;
        let Some(sh) = c.fx.layer.shared() else {
            rep.skip(short, "the layer has no shared expert");
            return Ok(());
        };
        let x = c.fx.input.view();
        if short == "shared_expert_output" {
            let y = expert_forward(sh.bank(), 0, x).map_err(|e| c.err(e))?;
            rep.dense(short, y.view(), Side::Host)
        } else if let Some(g) = sh.gate() {
            let l = x.dot(g).insert_axis(Axis(1));
            rep.dense(short, l.view(), Side::Host)
        } else {
            rep.skip(short, "the shared expert has no gate");
            Ok(())
        }
    }
}
