//! report.html: one self-contained file (inline CSS and SVG, no scripts, no network): summary, first
//! divergence, error-versus-layer plots, an attention heatmap for a chosen head, diversity figures,
//! provenance. The page is a minijinja template (autoescaped); the plots are SVG built here.
//!
//! What repeats across cases is written once and linked: the limits' reasons (one list, each check row
//! names its reason by number), the golden entries, and heatmap panels identical to one already drawn
//! (an SVG `<use>`). Heatmap cells are paths, one per shade. The default suites' page stays under
//! [`BUDGET_BYTES`] (tests/suites.rs holds it to that).

use super::{CaseReport, Heatmap, Report};
use crate::error::{Error, Result};
use crate::vocab::Check;
use minijinja::{context, AutoEscape, Environment, Value};
use std::collections::HashMap;
use std::fmt::Write;

const TEMPLATE: &str = include_str!("report.html.j2");

/// The size report.html of one backend's default suites must stay under (`lockstep validate --backend
/// cpu`, or `cuda`): measured 786 kB for the CPU suites' 23 cases (6.2 MB before the page shared what
/// repeats and drew heatmap cells as paths).
pub const BUDGET_BYTES: usize = 1_000_000;

pub fn render(r: &Report) -> Result<String> {
    let mut env = Environment::new();
    // Block tags leave no blank lines behind (a check row is one line).
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_formatter(html_formatter);
    env.add_template("report.html", TEMPLATE).map_err(|e| Error::Other(format!("report template: {e}")))?;
    let mut reasons = Numbered::default();
    let mut goldens = Numbered::default();
    let mut panels = Panels::default();
    // The golden entries' paths, beside their JSON in `goldens`.
    let mut golden_paths: Vec<String> = Vec::new();
    let plots: Vec<Value> = r
        .cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let reason_ids: Vec<Option<usize>> = c.checks.iter().map(|k| k.reason.as_ref().map(|s| reasons.id(s))).collect();
            let golden_id = c.golden_entry.as_ref().map(|g| goldens.id(&one_key_per_line(g)));
            if golden_paths.len() < goldens.items.len() {
                let path = c.golden_entry.as_ref().and_then(|g| g["path"].as_str()).unwrap_or("golden");
                golden_paths.push(path.to_string());
            }
            let attention = c.attention.as_ref().map(|hm| panels.heatmap_svg(hm, &format!("h{i}"), !c.passed)).unwrap_or_default();
            context! {
                coverage_summary => c.coverage.as_ref().map(|k| k.summary()),
                not_dumped_by_family => c.coverage.as_ref().map(|k| k.not_dumped_by_family()),
                growth => Value::from_safe_string(growth_svg(c)),
                attention => Value::from_safe_string(attention),
                attention_cell_values => !c.passed,
                diversity => Value::from_safe_string(diversity_svg(c)),
                reason_ids => reason_ids,
                golden_id => golden_id,
            }
        })
        .collect();
    let provenance = Value::from_safe_string(esc_text(&serde_json::to_string_pretty(&r.provenance).unwrap_or_default()));
    // Checks a dump gave no data for (`tokens`, …): said next to the verdict, never counted as passed.
    let mut not_checked: Vec<&str> = r.cases.iter().filter_map(|c| c.coverage.as_ref()).flat_map(|k| k.not_checked.iter().map(String::as_str)).collect();
    not_checked.sort_unstable();
    not_checked.dedup();
    let tmpl = env.get_template("report.html").map_err(|e| Error::Other(e.to_string()))?;
    tmpl.render(context! {
        report => Value::from_serialize(r),
        plots => plots,
        provenance => provenance,
        not_checked => not_checked,
        reasons => reasons.items,
        goldens => golden_paths.into_iter().zip(goldens.items.iter().map(|j| Value::from_safe_string(esc_text(j)))).collect::<Vec<_>>(),
    })
    .map_err(|e| Error::Other(format!("rendering report.html: {e}")))
}

/// minijinja's HTML escaping, less the `/` → `&#x2f;` it also does (six bytes for every slash of every
/// tap name and path; a slash is harmless in HTML text and quoted attributes).
fn html_formatter(out: &mut minijinja::Output, state: &minijinja::State, value: &Value) -> std::result::Result<(), minijinja::Error> {
    match (state.auto_escape(), value.as_str()) {
        (AutoEscape::Html, Some(s)) if !value.is_safe() => {
            out.write_str(&esc(s)).map_err(|e| minijinja::Error::new(minijinja::ErrorKind::WriteFailure, e.to_string()))
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// A JSON object with one key per line and each value on its key's line (token lists stay one line).
fn one_key_per_line(v: &serde_json::Value) -> String {
    match v.as_object() {
        Some(o) => {
            let lines: Vec<String> = o.iter().map(|(k, v)| format!("  {}: {v}", serde_json::Value::from(k.as_str()))).collect();
            format!("{{\n{}\n}}", lines.join(",\n"))
        }
        None => v.to_string(),
    }
}

/// Distinct strings in order of first use, each with its 1-based number.
#[derive(Default)]
struct Numbered {
    items: Vec<String>,
    index: HashMap<String, usize>,
}

impl Numbered {
    fn id(&mut self, s: &str) -> usize {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        self.items.push(s.to_string());
        self.index.insert(s.to_string(), self.items.len());
        self.items.len()
    }
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
    // The taps check's limit as a dashed line, when it is a rel L2 (with calibrated goldens each tap has its
    // own limit and the check's value is error / limit: no single line then).
    if let Some(limit) =
        c.checks.iter().find(|k| k.check == Some(Check::Taps) && k.metric.starts_with("rel")).map(|k| k.limit).filter(|l| l.is_finite() && *l > 0.0)
    {
        let yy = y(limit);
        let _ = write!(
            s,
            r##"<line x1="{ml}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#000" stroke-dasharray="4 3"/><text x="{}" y="{:.1}" font-size="9">limit</text>"##,
            w - mr,
            w - mr - 28.0,
            yy - 3.0
        );
    }
    // One group per family: its values as one tooltip, its line, its points as round dots (zero-length
    // strokes with round caps, r = 2) and its legend swatch; the legend's names follow in one group.
    let mut legend = String::new();
    s.push_str(r#"<g fill="none" stroke-width="1.5" stroke-linecap="round">"#);
    for (i, (fam, pts)) in c.growth.iter().enumerate() {
        let col = COLORS[i % COLORS.len()];
        let xy: Vec<(f64, f64)> = pts.iter().map(|(l, v)| (x(*l as f64), y(*v))).collect();
        let values: Vec<String> = pts.iter().map(|(l, v)| format!("{l}: {v:.3e}")).collect();
        let _ = write!(s, r#"<g stroke="{col}"><title>{}, rel L2 by layer: {}</title>"#, esc(fam), values.join(", "));
        if xy.len() > 1 {
            let line: Vec<String> = xy.iter().map(|(a, b)| format!("{},{}", num1(*a), num1(*b))).collect();
            let _ = write!(s, r#"<polyline points="{}"/>"#, line.join(" "));
        }
        let dots: String = xy.iter().map(|(a, b)| format!("M{} {}h0", num1(*a), num1(*b))).collect();
        let _ = write!(s, r#"<path stroke-width="4" d="{dots}"/>"#);
        let ly = mt + 12.0 * i as f64 + 6.0;
        if ly < h - mb {
            let _ = write!(s, r#"<path stroke-width="3" stroke-linecap="butt" d="M{} {}h10"/>"#, w - mr + 8.0, num1(ly - 1.5));
            let _ = write!(legend, r#"<text x="{}" y="{}">{}</text>"#, w - mr + 22.0, num1(ly + 1.0), esc(fam));
        }
        s.push_str("</g>");
    }
    let _ = write!(s, r#"</g><g font-size="10">{legend}</g>"#);
    s.push_str("</svg>");
    s
}

/// A coordinate to 0.1, without a trailing `.0`.
fn num1(v: f64) -> String {
    let s = format!("{v:.1}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

/// Escaped for an element's text (quotes need no escaping there: JSON keeps its size).
fn esc_text(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#x27;")
}

/// The heatmap panels already on the page, by content: a panel drawn again is a `<use>` of the first
/// (the engine's panel of a passing case is usually the golden's, pixel for pixel; a CPU and a CUDA
/// case of one golden share its panel).
#[derive(Default)]
pub struct Panels {
    drawn: HashMap<(usize, usize, Vec<u8>, bool), String>,
}

/// How light a heatmap cell is: 255 for 0 (white), 0 for the panel's maximum; square root for contrast.
fn shade(v: f32, scale: f32) -> u8 {
    let t = (v / scale).clamp(0.0, 1.0);
    (255.0 * (1.0 - t.sqrt())) as u8
}

impl Panels {
    /// Golden, engine and |difference| of one head's attention probabilities, as grids of cells.
    /// `ids`: a prefix unique on the page. `cell_values`: every cell of the difference panel carries its
    /// golden and engine values as a tooltip (a failing case's); otherwise each row carries its largest
    /// difference (report.json holds every value).
    pub fn heatmap_svg(&mut self, hm: &Heatmap, ids: &str, cell_values: bool) -> String {
        let cell = (360.0 / hm.cols.max(hm.rows).max(1) as f64).clamp(2.0, 24.0);
        let (gw, gh) = (cell * hm.cols as f64, cell * hm.rows as f64);
        let pad = 20.0;
        let (w, h) = (3.0 * gw + 4.0 * pad, gh + 2.0 * pad);
        let n = hm.rows * hm.cols;
        let at = |d: &[f32], i: usize| d.get(i).copied().unwrap_or(0.0);
        let diff: Vec<f32> = (0..n).map(|i| (at(&hm.engine, i) - at(&hm.golden, i)).abs()).collect();
        let dmax = diff.iter().cloned().fold(0f32, f32::max).max(1e-30);
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}" role="img" aria-label="attention heatmap">"#
        );
        let panels: [(&str, &[f32], f32, bool); 3] =
            [("golden", &hm.golden, 1.0, false), ("engine", &hm.engine, 1.0, false), ("|engine − golden|", &diff, dmax, true)];
        for (p, (title, data, scale, red)) in panels.iter().enumerate() {
            let ox = pad + p as f64 * (gw + pad);
            let _ = write!(
                s,
                r#"<text x="{ox:.1}" y="{:.1}" font-size="11">{}{}</text>"#,
                pad - 6.0,
                esc(title),
                if p == 2 { format!(" (max {dmax:.2e})") } else { String::new() }
            );
            let shades: Vec<u8> = (0..n).map(|i| shade(at(data, i), *scale)).collect();
            // Cells in cell units (the group is scaled by the cell size), strokes on the rows' centre lines.
            let place = format!(r#"transform="translate({ox:.1} {:.2}) scale({cell:.3})" stroke-width="1""#, pad + cell / 2.0);
            let key = (hm.rows, hm.cols, shades, *red);
            match self.drawn.get(&key) {
                Some(id) => {
                    let _ = write!(s, r##"<use href="#{id}" {place}/>"##);
                }
                None => {
                    let id = format!("{ids}p{p}");
                    // The placement wraps the group: a <use> of it places the cells again without this transform.
                    let _ = write!(s, r#"<g {place}><g id="{id}">{}</g></g>"#, cells_by_shade(&key.2, hm.cols, *red));
                    self.drawn.insert(key, id);
                }
            }
            let _ = write!(s, r##"<rect x="{ox:.1}" y="{pad}" width="{gw:.1}" height="{gh:.1}" fill="none" stroke="#999"/>"##);
        }
        // Tooltips over the difference panel: transparent cells (or rows) in the same cell units.
        let ox = pad + 2.0 * (gw + pad);
        let _ = write!(s, r#"<g transform="translate({ox:.1} {pad}) scale({cell:.3})" fill-opacity="0">"#);
        for r in 0..hm.rows {
            if cell_values {
                for c in 0..hm.cols {
                    let i = r * hm.cols + c;
                    let (g, e) = (at(&hm.golden, i), at(&hm.engine, i));
                    if g != 0.0 || e != 0.0 {
                        let _ = write!(s, r#"<rect x="{c}" y="{r}" width="1" height="1"><title>row {r} col {c}: golden {g:.4}, engine {e:.4}</title></rect>"#);
                    }
                }
            } else {
                let row = &diff[r * hm.cols..(r + 1) * hm.cols];
                let (c, d) = row.iter().enumerate().fold((0, 0f32), |best, (c, &d)| if d > best.1 { (c, d) } else { best });
                let _ = write!(s, r#"<rect y="{r}" width="{}" height="1"><title>row {r}: max {d:.2e} (col {c})</title></rect>"#, hm.cols);
            }
        }
        s.push_str("</g></svg>");
        s
    }
}

/// A panel's cells as one stroked path per shade (`M{col} {row}h{run}`: a horizontal run of cells of
/// that shade, the stroke one cell wide, in a group shifted down half a cell), instead of an element per
/// cell. White cells (probability 0: the causal mask) are the page itself.
fn cells_by_shade(shades: &[u8], cols: usize, red: bool) -> String {
    // Per shade: its path data and the pen's position after the last run drawn.
    let mut paths: std::collections::BTreeMap<u8, (String, Option<(i64, i64)>)> = std::collections::BTreeMap::new();
    for (r, row) in shades.chunks(cols.max(1)).enumerate() {
        let mut c = 0;
        while c < row.len() {
            let v = row[c];
            let run = row[c..].iter().take_while(|&&x| x == v).count();
            if v != 255 {
                let (d, pen) = paths.entry(v).or_default();
                let (ci, ri) = (c as i64, r as i64);
                // Relative moves are shorter than absolute ones once the pen is down.
                match *pen {
                    None => write!(d, "M{ci} {ri}h{run}"),
                    Some((pc, pr)) => write!(d, "m{} {}h{run}", ci - pc, ri - pr),
                }
                .expect("writing to a String");
                *pen = Some((ci + run as i64, ri));
            }
            c += run;
        }
    }
    let mut s = String::new();
    for (v, (d, _)) in paths {
        let col = if red { format!("#ff{v:02x}{v:02x}") } else { format!("#{v:02x}{v:02x}ff") };
        let _ = write!(s, r#"<path stroke="{col}" d="{d}"/>"#);
    }
    s
}

/// Diversity statistics against their limits, as horizontal bars.
pub fn diversity_svg(c: &CaseReport) -> String {
    // The diversity statistics of every generation (greedy, sampled, the anti-cheat's): `diversity:{run}:{stat}`.
    let rows: Vec<_> = c
        .checks
        .iter()
        .filter(|k| matches!(k.check, Some(Check::Diversity | Check::DiversitySampled | Check::Anticheat)) && k.name.starts_with("diversity:"))
        .collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_merge_runs_and_leave_white_to_the_page() {
        // 2×3: row 0 = [0, 0, white], row 1 = [white, 7, 0]
        let d = cells_by_shade(&[0, 0, 255, 255, 7, 0], 3, false);
        assert_eq!(d, r##"<path stroke="#0000ff" d="M0 0h2m0 1h1"/><path stroke="#0707ff" d="M1 1h1"/>"##);
    }

    #[test]
    fn identical_panels_are_drawn_once() {
        let hm = Heatmap { tap: "s0/kq_soft_max-0".into(), head: 0, rows: 2, cols: 2, engine: vec![1.0, 0.0, 0.5, 0.5], golden: vec![1.0, 0.0, 0.5, 0.5] };
        let mut p = Panels::default();
        let a = p.heatmap_svg(&hm, "h0", false);
        // engine = golden: one group and a <use> of it; the zero difference draws no cell.
        assert_eq!(a.matches("<g id=").count(), 2, "{a}");
        assert!(a.contains(r##"<use href="#h0p0""##), "{a}");
        // A second case with the same golden and engine draws nothing new.
        let b = p.heatmap_svg(&hm, "h1", false);
        assert_eq!(b.matches("<g id=").count(), 0, "{b}");
        assert_eq!(b.matches("<use href=").count(), 3, "{b}");
        // Row tooltips, or every non-zero cell's values for a failing case.
        assert_eq!(b.matches("<title>row ").count(), 2);
        let c = p.heatmap_svg(&hm, "h2", true);
        assert_eq!(c.matches("<title>row ").count(), 3, "{c}");
        assert!(c.contains("row 1 col 0: golden 0.5000, engine 0.5000"), "{c}");
    }
}
