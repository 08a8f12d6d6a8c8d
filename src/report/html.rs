//! report.html: one self-contained file (inline CSS and SVG, no scripts, no network): summary, first
//! divergence, error-versus-layer plots, an attention heatmap for a chosen head, diversity figures,
//! provenance. The page is a minijinja template (autoescaped); the plots are SVG built here.

use super::{CaseReport, Heatmap, Report};
use crate::error::{Error, Result};
use minijinja::{context, Environment, Value};
use std::fmt::Write;

const TEMPLATE: &str = include_str!("report.html.j2");

pub fn render(r: &Report) -> Result<String> {
    let mut env = Environment::new();
    env.add_template("report.html", TEMPLATE).map_err(|e| Error::Other(format!("report template: {e}")))?;
    let plots: Vec<Value> = r
        .cases
        .iter()
        .map(|c| {
            context! {
                coverage_summary => c.coverage.as_ref().map(|k| k.summary()),
                not_dumped_by_family => c.coverage.as_ref().map(|k| k.not_dumped_by_family()),
                growth => Value::from_safe_string(growth_svg(c)),
                attention => Value::from_safe_string(c.attention.as_ref().map(heatmap_svg).unwrap_or_default()),
                diversity => Value::from_safe_string(diversity_svg(c)),
            }
        })
        .collect();
    let provenance = serde_json::to_string_pretty(&r.provenance).unwrap_or_default();
    // Checks a dump gave no data for (`tokens`, …): said next to the verdict, never counted as passed.
    let mut not_checked: Vec<&str> = r.cases.iter().filter_map(|c| c.coverage.as_ref()).flat_map(|k| k.not_checked.iter().map(String::as_str)).collect();
    not_checked.sort_unstable();
    not_checked.dedup();
    let tmpl = env.get_template("report.html").map_err(|e| Error::Other(e.to_string()))?;
    tmpl.render(context! { report => Value::from_serialize(r), plots => plots, provenance => provenance, not_checked => not_checked })
        .map_err(|e| Error::Other(format!("rendering report.html: {e}")))
}

const COLORS: [&str; 10] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"];

/// Error (rel L2, log scale) versus layer, one line per tap family, with the exact-tier limit dashed.
pub fn growth_svg(c: &CaseReport) -> String {
    if c.growth.is_empty() {
        return String::new();
    }
    let (w, h, ml, mb, mt, mr) = (640.0, 300.0, 56.0, 34.0, 12.0, 170.0);
    let max_layer = c.growth.values().flat_map(|v| v.iter().map(|p| p.0)).max().unwrap_or(0).max(1) as f64;
    let clamp = |v: f64| if v.is_finite() { v.max(1e-12) } else { 10.0 };
    let vals: Vec<f64> = c.growth.values().flat_map(|v| v.iter().map(|p| clamp(p.1))).collect();
    let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min).log10().floor().min(-6.0);
    let hi = vals.iter().cloned().fold(0.0, f64::max).log10().ceil().max(lo + 1.0);
    let x = |l: f64| ml + (w - ml - mr) * l / max_layer;
    let y = |v: f64| mt + (h - mt - mb) * (hi - clamp(v).log10()) / (hi - lo);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="error versus layer">"#
    );
    let _ = write!(s, r##"<rect x="{ml}" y="{mt}" width="{}" height="{}" fill="#fafafa" stroke="#ccc"/>"##, w - ml - mr, h - mt - mb);
    let mut e = lo as i32;
    while e <= hi as i32 {
        let yy = y(10f64.powi(e));
        let _ = write!(
            s,
            r##"<line x1="{ml}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#e4e4e4"/><text x="{}" y="{:.1}" font-size="10" text-anchor="end">1e{e}</text>"##,
            w - mr,
            ml - 4.0,
            yy + 3.0
        );
        e += 1;
    }
    for l in 0..=max_layer as usize {
        if max_layer <= 12.0 || l % 4 == 0 {
            let _ = write!(s, r#"<text x="{:.1}" y="{}" font-size="10" text-anchor="middle">{l}</text>"#, x(l as f64), h - mb + 14.0);
        }
    }
    let _ = write!(s, r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">layer</text>"#, (ml + w - mr) / 2.0, h - 4.0);
    let _ = write!(s, r#"<text x="12" y="{}" font-size="11" transform="rotate(-90 12 {})" text-anchor="middle">rel L2</text>"#, h / 2.0, h / 2.0);
    if let Some(limit) = c.checks.iter().find(|k| k.name.starts_with("taps:")).map(|k| k.limit).filter(|l| l.is_finite() && *l > 0.0) {
        let yy = y(limit);
        let _ = write!(
            s,
            r##"<line x1="{ml}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#000" stroke-dasharray="4 3"/><text x="{}" y="{:.1}" font-size="9">limit</text>"##,
            w - mr,
            w - mr - 28.0,
            yy - 3.0
        );
    }
    for (i, (fam, pts)) in c.growth.iter().enumerate() {
        let col = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts.iter().map(|(l, v)| format!("{:.1},{:.1}", x(*l as f64), y(*v))).collect();
        let _ = write!(s, r#"<polyline fill="none" stroke="{col}" stroke-width="1.5" points="{}"/>"#, path.join(" "));
        for (l, v) in pts {
            let _ =
                write!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="2" fill="{col}"><title>{} layer {l}: {v:.3e}</title></circle>"#, x(*l as f64), y(*v), esc(fam));
        }
        let ly = mt + 12.0 * i as f64 + 6.0;
        if ly < h - mb {
            let _ = write!(
                s,
                r#"<rect x="{}" y="{:.1}" width="10" height="3" fill="{col}"/><text x="{}" y="{:.1}" font-size="10">{}</text>"#,
                w - mr + 8.0,
                ly - 3.0,
                w - mr + 22.0,
                ly + 1.0,
                esc(fam)
            );
        }
    }
    s.push_str("</svg>");
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Golden, engine and |difference| of one head's attention probabilities, as grids of cells.
pub fn heatmap_svg(hm: &Heatmap) -> String {
    let cell = (360.0 / hm.cols.max(hm.rows).max(1) as f64).clamp(2.0, 24.0);
    let (gw, gh) = (cell * hm.cols as f64, cell * hm.rows as f64);
    let pad = 20.0;
    let (w, h) = (3.0 * gw + 4.0 * pad, gh + 2.0 * pad);
    let diff: Vec<f32> = hm.engine.iter().zip(&hm.golden).map(|(a, b)| (a - b).abs()).collect();
    let dmax = diff.iter().cloned().fold(0f32, f32::max).max(1e-30);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}" role="img" aria-label="attention heatmap">"#
    );
    let panels: [(&str, &[f32], f32); 3] = [("golden", &hm.golden, 1.0), ("engine", &hm.engine, 1.0), ("|engine − golden|", &diff, dmax)];
    for (p, (title, data, scale)) in panels.iter().enumerate() {
        let ox = pad + p as f64 * (gw + pad);
        let _ = write!(
            s,
            r#"<text x="{ox:.1}" y="{:.1}" font-size="11">{}{}</text>"#,
            pad - 6.0,
            esc(title),
            if p == 2 { format!(" (max {dmax:.2e})") } else { String::new() }
        );
        for r in 0..hm.rows {
            for col in 0..hm.cols {
                let v = data.get(r * hm.cols + col).copied().unwrap_or(0.0);
                let t = (v / scale).clamp(0.0, 1.0);
                let shade = (255.0 * (1.0 - t.sqrt())) as u8;
                let fill = if p == 2 { format!("rgb(255,{shade},{shade})") } else { format!("rgb({shade},{shade},255)") };
                let _ = write!(
                    s,
                    r#"<rect x="{:.1}" y="{:.1}" width="{cell:.1}" height="{cell:.1}" fill="{fill}"><title>row {r} col {col}: {v:.4}</title></rect>"#,
                    ox + col as f64 * cell,
                    pad + r as f64 * cell
                );
            }
        }
        let _ = write!(s, r##"<rect x="{ox:.1}" y="{pad}" width="{gw:.1}" height="{gh:.1}" fill="none" stroke="#999"/>"##);
    }
    s.push_str("</svg>");
    s
}

/// Diversity statistics against their limits, as horizontal bars.
pub fn diversity_svg(c: &CaseReport) -> String {
    let rows: Vec<_> = c.checks.iter().filter(|k| k.name.starts_with("diversity:")).collect();
    if rows.is_empty() {
        return String::new();
    }
    let (w, rh) = (560.0, 20.0);
    let h = rh * rows.len() as f64 + 10.0;
    let mut s = String::new();
    let _ =
        write!(s, r#"<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="diversity">"#);
    for (i, k) in rows.iter().enumerate() {
        let top = 5.0 + i as f64 * rh;
        let scale = k.value.abs().max(k.limit.abs()).max(1e-9) * 1.1;
        let bw = 260.0 * (k.value / scale).clamp(0.0, 1.0);
        let lx = 230.0 + 260.0 * (k.limit / scale).clamp(0.0, 1.0);
        let col = if k.passed { "#2ca02c" } else { "#d62728" };
        let _ = write!(
            s,
            r#"<text x="0" y="{:.1}" font-size="11">{}</text><rect x="230" y="{:.1}" width="{bw:.1}" height="12" fill="{col}"/><line x1="{lx:.1}" x2="{lx:.1}" y1="{:.1}" y2="{:.1}" stroke="black" stroke-width="2"/><text x="{:.1}" y="{:.1}" font-size="10">{:.3} (limit {:.3})</text>"#,
            top + 11.0,
            esc(k.name.trim_start_matches("diversity:")),
            top + 1.0,
            top - 1.0,
            top + 15.0,
            495.0,
            top + 11.0,
            k.value,
            k.limit
        );
    }
    s.push_str("</svg>");
    s
}
