//! From a layer parameter (or its gradient) back to the checkpoint tensors it was assembled from, by the checkpoint
//! name the preset recorded ([`moe_core::Param::hf_name`], convention in the crate docs): `{e}` marks one tensor per
//! expert stacked on a leading axis `E`; ` + ` joins tensors along each expert's rows (gate rows, then up rows), or
//! along the first axis of a tensor without `{e}`; one-expert shared banks and Qwen2-MoE's shared-expert gate differ
//! from the checkpoint only by leading axes of size 1. [`split_by_hf_name`] inverts that assembly, so a gradient
//! named `experts.gate_up` `[E, 2f, d]` becomes `experts.{e}.w1.weight` and `experts.{e}.w3.weight` `[f, d]` for
//! every `e`, the tensors a checkpoint writer or a comparison with PyTorch gradients needs.

use ndarray::{ArrayD, ArrayViewD, Axis};

/// Splits `value` (a parameter or gradient in the layer's layout) into the checkpoint tensors named by `hf_name`,
/// in checkpoint shape up to leading axes of size 1 (which the layer adds for one-expert banks). The ` + `-joined
/// parts are equal shares of the joined axis (every family joins gate and up projections of one width).
///
/// # Errors
/// A message when the shape cannot hold the name's parts: no expert axis for `{e}`, a joined axis that does not
/// divide into the parts, an empty name.
pub fn split_by_hf_name(
    hf_name: &str,
    value: ArrayViewD<'_, f32>,
) -> Result<Vec<(String, ArrayD<f32>)>, String> {
    let parts: Vec<&str> = hf_name.split(" + ").filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return Err("empty checkpoint name".into());
    }
    let per_expert = parts.iter().any(|p| p.contains("{e}"));
    if per_expert && !parts.iter().all(|p| p.contains("{e}")) {
        return Err(format!("{hf_name}: mixes per-expert and whole tensors"));
    }
    let mut value = value;
    if !per_expert {
        // A one-expert bank's leading axis of size 1 is not in the checkpoint.
        while value.ndim() > 1 && value.shape()[0] == 1 {
            value = value.index_axis_move(Axis(0), 0);
        }
    }
    let axis = usize::from(per_expert);
    if value.ndim() <= axis {
        return Err(format!(
            "{hf_name}: a tensor of shape {:?} has no axis {axis} to split",
            value.shape()
        ));
    }
    let n = value.shape()[axis];
    if !n.is_multiple_of(parts.len()) {
        return Err(format!(
            "{hf_name}: axis {axis} of {:?} does not divide into {} parts",
            value.shape(),
            parts.len()
        ));
    }
    let share = n / parts.len();
    let mut out = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let piece = value.slice_axis(Axis(axis), ndarray::Slice::from(i * share..(i + 1) * share));
        if per_expert {
            for (e, one) in piece.axis_iter(Axis(0)).enumerate() {
                out.push((part.replace("{e}", &e.to_string()), one.to_owned()));
            }
        } else {
            out.push((part.to_string(), piece.to_owned()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array, IxDyn};

    fn ramp(shape: &[usize]) -> ArrayD<f32> {
        let n: usize = shape.iter().product();
        Array::from_shape_vec(IxDyn(shape), (0..n).map(|i| i as f32).collect()).expect("shape")
    }

    #[test]
    fn per_expert_joined_rows_split_into_each_expert_and_part() {
        // experts.gate_up [E = 2, 2f = 4, d = 3] from w1 (rows 0..2) and w3 (rows 2..4) of each expert.
        let v = ramp(&[2, 4, 3]);
        let got = split_by_hf_name("experts.{e}.w1.weight + experts.{e}.w3.weight", v.view())
            .expect("splits");
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "experts.0.w1.weight",
                "experts.1.w1.weight",
                "experts.0.w3.weight",
                "experts.1.w3.weight"
            ]
        );
        assert_eq!(got[0].1.shape(), &[2, 3]);
        // Expert 1's up rows are rows 2..4 of expert 1: values 12 + 6 .. = 18..24.
        assert_eq!(
            got[3].1.iter().copied().collect::<Vec<_>>(),
            (18..24).map(|i| i as f32).collect::<Vec<_>>()
        );
    }

    #[test]
    fn whole_tensors_shared_banks_and_gates() {
        let v = ramp(&[1, 4, 2]);
        let got = split_by_hf_name(
            "shared_expert.gate_proj.weight + shared_expert.up_proj.weight",
            v.view(),
        )
        .expect("splits");
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].1.shape(), &[2, 2]);
        assert_eq!(got[1].1[[0, 0]], 4.0);
        let g = ramp(&[5]);
        let got = split_by_hf_name("shared_expert_gate.weight", g.view()).expect("splits");
        assert_eq!(got[0].1, g);
        assert!(split_by_hf_name("a.{e} + b.{e}", ramp(&[2, 3, 1]).view()).is_err());
        assert!(split_by_hf_name("a.{e}", ramp(&[]).view()).is_err());
        assert!(split_by_hf_name("", ramp(&[2]).view()).is_err());
        assert!(split_by_hf_name("a.{e} + b", ramp(&[2, 2]).view()).is_err());
    }
}
