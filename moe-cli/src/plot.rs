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
