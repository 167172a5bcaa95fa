//! `--plot FILE.svg`: each router's load per expert as a row of bars, written as a self-contained SVG.

use std::fmt::Write as _;

/// Most bars drawn per row; above this many experts, consecutive experts are grouped into one bar showing their
/// mean load, so the chart stays readable for any E.
pub(crate) const MAX_BARS: usize = 256;

/// Groups `loads` into at most [`MAX_BARS`] bars of `group` consecutive experts each, as mean loads (rounded).
fn group_loads(loads: &[usize], group: usize) -> Vec<usize> {
    loads
        .chunks(group.max(1))
        .map(|c| (c.iter().sum::<usize>() as f64 / c.len() as f64).round() as usize)
        .collect()
}

/// Renders one bar row per `(label, loads)`; bars are scaled to the largest load of all rows, and a dashed line
/// marks each row's mean (perfect balance). Above [`MAX_BARS`] experts a bar is the mean of a group of experts.
pub(crate) fn load_svg(title: &str, rows: &[(String, Vec<usize>)]) -> String {
    let n_experts = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    let group = n_experts.div_ceil(MAX_BARS).max(1);
    let grouped: Vec<(String, Vec<usize>)> = rows
        .iter()
        .map(|(l, loads)| (l.clone(), group_loads(loads, group)))
        .collect();
    let rows = grouped.as_slice();
    let e = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    let bar_w = (900.0 / e.max(1) as f64).clamp(3.0, 14.0);
    let (left, row_h, top) = (230.0f64, 90.0f64, 40.0f64);
    let max = rows
        .iter()
        .flat_map(|r| r.1.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let width = left + bar_w * e as f64 + 40.0;
    let height = top + row_h * rows.len() as f64 + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="14">{}</text>"#,
        escape(title)
    );
    for (i, (label, loads)) in rows.iter().enumerate() {
        let base = top + row_h * (i as f64 + 1.0) - 15.0;
        let _ = writeln!(
            s,
            r#"<text x="10" y="{:.1}">{}</text>"#,
            base - 30.0,
            escape(label)
        );
        for (j, &c) in loads.iter().enumerate() {
            let h = (row_h - 25.0) * c as f64 / max;
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="#4878a8"><title>{}: {c}</title></rect>"##,
                left + bar_w * j as f64,
                base - h,
                (bar_w - 1.0).max(1.0),
                if group == 1 {
                    format!("expert {j}")
                } else {
                    format!(
                        "experts {}..{} (mean)",
                        j * group,
                        ((j + 1) * group).min(n_experts) - 1
                    )
                }
            );
        }
        if !loads.is_empty() {
            let mean = loads.iter().sum::<usize>() as f64 / loads.len() as f64;
            let y = base - (row_h - 25.0) * mean / max;
            let _ = writeln!(
                s,
                r##"<line x1="{left:.1}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#c03030" stroke-dasharray="4 3"/>"##,
                left + bar_w * loads.len() as f64
            );
        }
        let _ = writeln!(
            s,
            r##"<line x1="{left:.1}" x2="{:.1}" y1="{base:.1}" y2="{base:.1}" stroke="#333"/>"##,
            left + bar_w * e as f64
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{left:.0}" y="{:.0}" fill="gray">experts 0..{}{} (bar height: tokens; dashed: mean load)</text>"#,
        height - 10.0,
        n_experts.saturating_sub(1),
        if group > 1 {
            format!(", {group} experts per bar")
        } else {
            String::new()
        }
    );
    s.push_str("</svg>\n");
    s
}

fn escape(t: &str) -> String {
    crate::output::escape_control(t)
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Colours of the lines of [`curves_svg`] (matplotlib's `tab10`), reused in turn past ten series.
const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// One line of a [`curves_svg`] panel: a label for the legend and its points `(x, y)`; non-finite points are
/// left out. A dashed line marks a bound or reference rather than a measured series.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

/// One panel of a [`curves_svg`] chart: its title, the y axis' name and the lines, drawn over a shared x axis.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Panel {
    pub title: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

/// The rounded range `[lo, hi]` of the finite `values`, padded 5 %; a flat or empty range is widened so the
/// axis has a length.
fn axis_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        let pad = (hi.abs() * 0.05).max(0.5);
        return (lo - pad, hi + pad);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

/// A tick label: few digits, as the range needs.
fn tick(v: f64, span: f64) -> String {
    if span >= 50.0 {
        format!("{v:.0}")
    } else if span >= 5.0 {
        format!("{v:.1}")
    } else if span >= 0.5 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Renders `panels` stacked, one line per series with a legend on the right, over the x axis `x_label` (from 0 to
/// the largest x, non-negative x expected); a self-contained SVG in the style of [`load_svg`]. Each point carries a tooltip with its values.
pub(crate) fn curves_svg(title: &str, x_label: &str, panels: &[Panel]) -> String {
    let (left, plot_w, legend_w, panel_h, gap, top) =
        (80.0f64, 640.0f64, 260.0f64, 260.0f64, 70.0f64, 40.0f64);
    let width = left + plot_w + legend_w;
    let height = top + (panel_h + gap) * panels.len() as f64 + 10.0;
    // The x axis starts at 0 (steps, samples) and ends at the last point.
    let x_hi = panels
        .iter()
        .flat_map(|p| p.series.iter())
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let (x_lo, x_hi) = (0.0, if x_hi > 0.0 { x_hi } else { 1.0 });
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="14">{}</text>"#,
        escape(title)
    );
    for (i, panel) in panels.iter().enumerate() {
        let y0 = top + (panel_h + gap) * i as f64 + 25.0;
        draw_panel(&mut s, panel, (left, y0, plot_w, panel_h), (x_lo, x_hi));
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="gray">{}</text>"#,
            left + plot_w / 2.0,
            y0 + panel_h + 32.0,
            escape(x_label)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Draws one panel in the box `(x, y, w, h)` with the shared x range.
fn draw_panel(
    s: &mut String,
    panel: &Panel,
    (bx, by, bw, bh): (f64, f64, f64, f64),
    x: (f64, f64),
) {
    let (y_lo, y_hi) = axis_range(
        panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1)),
    );
    let px = |v: f64| bx + bw * (v - x.0) / (x.1 - x.0);
    let py = |v: f64| by + bh - bh * (v - y_lo) / (y_hi - y_lo);
    let _ = writeln!(
        s,
        r#"<text x="{bx:.1}" y="{:.1}" font-size="13">{}</text>"#,
        by - 8.0,
        escape(&panel.title)
    );
    let _ = writeln!(
        s,
        r##"<rect x="{bx:.1}" y="{by:.1}" width="{bw:.1}" height="{bh:.1}" fill="none" stroke="#333"/>"##
    );
    for t in 0..=4 {
        let f = f64::from(t) / 4.0;
        let (yv, xv) = (y_lo + (y_hi - y_lo) * f, x.0 + (x.1 - x.0) * f);
        let (yy, xx) = (py(yv), px(xv));
        let _ = writeln!(
            s,
            r##"<line x1="{bx:.1}" x2="{:.1}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            bx + bw,
            bx - 6.0,
            yy + 4.0,
            tick(yv, y_hi - y_lo)
        );
        let _ = writeln!(
            s,
            r#"<text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            by + bh + 16.0,
            tick(xv, x.1 - x.0)
        );
    }
    let _ = writeln!(
        s,
        r#"<text transform="translate({:.1},{:.1}) rotate(-90)" text-anchor="middle" fill="gray">{}</text>"#,
        bx - 55.0,
        by + bh / 2.0,
        escape(&panel.y_label)
    );
    for (j, series) in panel.series.iter().enumerate() {
        let colour = PALETTE[j % PALETTE.len()];
        let pts: Vec<(f64, f64)> = series
            .points
            .iter()
            .copied()
            .filter(|(a, b)| a.is_finite() && b.is_finite())
            .collect();
        let path: Vec<String> = pts
            .iter()
            .map(|&(a, b)| format!("{:.1},{:.1}", px(a), py(b)))
            .collect();
        let dash = if series.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>"#,
            path.join(" ")
        );
        for &(a, b) in &pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{colour}"><title>{}: {a} → {b:.4}</title></circle>"#,
                px(a),
                py(b),
                escape(&series.label)
            );
        }
        let ly = by + 14.0 + 18.0 * j as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="{colour}" stroke-width="3"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            bx + bw + 15.0,
            bx + bw + 40.0,
            ly - 4.0,
            ly - 4.0,
            bx + bw + 46.0,
            ly,
            escape(&series.label)
        );
    }
}

/// `moe cache-sim --plot`: hit rate (%) against slots per layer, one line per `(policy, points)`; the last
/// series (Belady's bound) dashed. One [`curves_svg`] panel.
pub(crate) fn hit_rate_svg(title: &str, lines: &[(String, Vec<(f64, f64)>)]) -> String {
    let n = lines.len();
    let panel = Panel {
        title: "hit rate against slots per layer (dashed: Belady's MIN, the offline bound)".into(),
        y_label: "hit rate %".into(),
        series: lines
            .iter()
            .enumerate()
            .map(|(i, (label, points))| Series {
                label: label.clone(),
                points: points.clone(),
                dashed: i + 1 == n,
            })
            .collect(),
    };
    curves_svg(title, "slots per layer (resident experts)", &[panel])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_have_one_line_per_series_and_skip_non_finite_points() {
        let panel = Panel {
            title: "val <loss>".into(),
            y_label: "nats".into(),
            series: vec![
                Series {
                    label: "a&b".into(),
                    points: vec![(0.0, 2.0), (10.0, f64::NAN), (20.0, 1.5)],
                    dashed: false,
                },
                Series {
                    label: "flat".into(),
                    points: vec![(10.0, 1.0)],
                    dashed: true,
                },
            ],
        };
        let svg = curves_svg("t", "step", &[panel.clone(), panel]);
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert_eq!(svg.matches("<circle").count(), 6);
        assert!(svg.contains("a&amp;b") && svg.contains("val &lt;loss&gt;"));
        assert!(!svg.contains("NaN"));
        // The dashed series is dashed in the plot and in the legend, in both panels; the other is not.
        assert_eq!(svg.matches("stroke-dasharray=\"6 4\"").count(), 4);
        assert_eq!(axis_range(std::iter::empty()), (0.0, 1.0));
        assert_eq!(axis_range([2.0].into_iter()), (1.5, 2.5));
    }
}
