//! An outside engine's dump read against a golden before anything is judged: what it covers, what can
//! be made comparable without guessing, and what cannot.
//!
//! - Made comparable (each said in [`Coverage::notes`]): size-1 axes dropped or added (`[T, W]` for
//!   `[1, 1, T, W]`: the same elements in the same order); F16/BF16/F64 storage converted to f32 (the
//!   storage dtype stays known through [`TapSource::stored_dtype`], so its rounding can be added to the
//!   limit); the last layer dumped with all T rows at the prefill where llama.cpp keeps only the last
//!   (`ffn_inp` onward, `norm`, `result_norm`, `result_output`): the last row is taken; steps beyond the
//!   golden's: ignored; a row-subset tap (the long goldens, src/rows.rs) dumped whole: cut to the rows the
//!   golden keeps ("rows kept: …").
//! - Covered: golden taps compared / not dumped, dump keys that name nothing in the golden (each with the
//!   nearest known name), checks that cannot run for lack of data (`tokens`, `diversity`).
//! - Refused with a specific [`Error::DumpTensor`] / [`Error::DumpFile`] naming the file, the tap, the
//!   expected and found shape or dtype and a layout hint: not safetensors, truncated, a header claiming
//!   a huge shape, integer dtypes for float taps, empty tensors, wrong rank, wrong element count, axes in
//!   another order (scores tokens-first, transposed 2-D, …), a row-subset tap with a number of rows that is
//!   neither the golden's nor the whole tap's, no key recognised (Hugging Face module names get their own
//!   hint), a step with taps but no logits.
//!
//! NaN and Inf values are not malformed: they go through to the comparison, where check 4 flags them.

use crate::checks::taps::token_axis;
use crate::checks::TapSource;
use crate::error::{BadTensor, Error, Result};
use crate::golden::{TapsFile, Tensor};
use crate::tapname::TapId;
use safetensors::Dtype;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

/// A dump key that names nothing the golden holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnknownKey {
    pub key: String,
    /// The nearest name the golden knows (`s0/Qcur-0.mul_mat` for `s0/Qcur-0`), if any.
    pub nearest: Option<String>,
}

impl std::fmt::Display for UnknownKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.nearest {
            Some(n) => write!(f, "{} → {n}?", self.key),
            None => write!(f, "{}", self.key),
        }
    }
}

/// What a dump holds, measured against its golden.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Coverage {
    /// Taps the golden holds (every step).
    pub golden_taps: usize,
    /// Golden taps the dump holds: these are compared.
    pub compared: usize,
    /// Golden taps the dump does not hold (graph order): never a failure, never the first divergence.
    pub not_dumped: Vec<String>,
    /// Dump keys that name nothing in the golden, each with the nearest known name.
    pub unknown: Vec<UnknownKey>,
    /// Steps of the dump beyond the golden's (ignored).
    pub ignored_steps: Vec<usize>,
    /// Steps whose logits (`s{k}/result_output`) are compared, contiguous from step 0.
    pub logit_steps: usize,
    /// Each normalization or omission, one sentence each.
    pub notes: Vec<String>,
    /// Checks that did not run for lack of data in the dump (`tokens`, `diversity`).
    pub not_checked: Vec<String>,
}

impl Coverage {
    /// One line: `compared 120 of 245 golden taps (125 not dumped); 3 unknown keys; …`.
    pub fn summary(&self) -> String {
        let mut s = format!("compared {} of {} golden taps", self.compared, self.golden_taps);
        if !self.not_dumped.is_empty() {
            s += &format!(" ({} not dumped)", self.not_dumped.len());
        }
        s += &format!("; logits of {} step{}", self.logit_steps, if self.logit_steps == 1 { "" } else { "s" });
        if !self.unknown.is_empty() {
            s += &format!("; {} unknown key{}", self.unknown.len(), if self.unknown.len() == 1 { "" } else { "s" });
        }
        if !self.ignored_steps.is_empty() {
            s += &format!("; step{} {} ignored", if self.ignored_steps.len() == 1 { "" } else { "s" }, join(&self.ignored_steps, ", "));
        }
        if !self.not_checked.is_empty() {
            s += &format!("; {} not checked", self.not_checked.join(", "));
        }
        s
    }

    /// The not-dumped taps grouped by family and stage, most frequent first: `norm.rms_norm.0 ×10`.
    pub fn not_dumped_by_family(&self) -> Vec<(String, usize)> {
        let mut by: BTreeMap<String, usize> = BTreeMap::new();
        for k in &self.not_dumped {
            let fam = TapId::parse_key(k).map_or_else(|| k.clone(), |t| t.family_stage());
            *by.entry(fam).or_default() += 1;
        }
        let mut v: Vec<_> = by.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// The lines the terminal shows under a compare verdict (the summary, then the details).
    pub fn lines(&self, max_items: usize) -> Vec<String> {
        let mut out = vec![format!("coverage: {}", self.summary())];
        if !self.not_dumped.is_empty() {
            let fams: Vec<String> = self.not_dumped_by_family().into_iter().map(|(f, n)| format!("{f} ×{n}")).collect();
            out.push(format!("  not dumped: {}", elide(&fams, max_items)));
        }
        if !self.unknown.is_empty() {
            let u: Vec<String> = self.unknown.iter().map(|u| u.to_string()).collect();
            out.push(format!("  unknown keys: {}", elide(&u, max_items)));
        }
        out.extend(self.notes.iter().map(|n| format!("  note: {n}")));
        out
    }
}

fn join<T: std::fmt::Display>(v: &[T], sep: &str) -> String {
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(sep)
}

fn elide(v: &[String], max: usize) -> String {
    if v.len() <= max {
        v.join(", ")
    } else {
        format!("{}, … ({} more)", v[..max].join(", "), v.len() - max)
    }
}

/// A dump made comparable: f32 tensors in the golden's shapes, keyed `s{k}/{tap}`, with the dtype each
/// was stored in, and the prompt ids and greedy continuation if the dump has them.
#[derive(Debug, Clone, Default)]
pub struct NormalizedDump {
    pub path: PathBuf,
    tensors: HashMap<String, Tensor>,
    stored: HashMap<String, Dtype>,
    pub tokens: Option<Vec<u32>>,
    pub continuation: Option<Vec<u32>>,
}

impl TapSource for NormalizedDump {
    fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.tensors.keys().cloned().collect();
        k.sort();
        k
    }
    fn tensor(&self, key: &str) -> Option<Result<Tensor>> {
        self.tensors.get(key).cloned().map(Ok)
    }
    fn stored_dtype(&self, key: &str) -> Option<Dtype> {
        self.stored.get(key).copied().filter(|d| *d != Dtype::F32)
    }
}

impl NormalizedDump {
    /// Logits per step, `s{k}/result_output` for k = 0, 1, … up to the first step without them.
    pub fn logits(&self) -> Vec<Vec<f32>> {
        (0..).map_while(|k| self.tensors.get(&format!("s{k}/result_output")).map(|t| t.data.clone())).collect()
    }
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }
}

const NAMING: &str = "tap keys are `s{step}/{llama.cpp callback name}`, e.g. s0/Qcur-0.rope (golden/README.md, \"Tensor naming inside a taps file\")";

/// Reads `dump_path` against `golden`: the normalized dump and its coverage, or the first problem that
/// makes it impossible to judge (with a count and a few names of the others).
pub fn load(dump_path: &Path, golden: &TapsFile) -> Result<(NormalizedDump, Coverage)> {
    check_container(dump_path, golden)?;
    let dump = TapsFile::open(dump_path).map_err(|e| match e {
        Error::Safetensors { path, reason } => Error::DumpFile {
            path,
            problem: format!("not a valid safetensors file: {reason}"),
            hint: "write the dump with the safetensors library (safetensors.numpy.save_file, the Python kit, or lockstep::golden::write_safetensors)".into(),
        },
        e => e,
    })?;
    let view = GoldenView::new(golden)?;
    let path = dump_path.to_path_buf();
    let mut out = NormalizedDump { path: path.clone(), ..Default::default() };
    let mut cov = Coverage { golden_taps: view.taps.len(), ..Default::default() };
    let mut problems: Vec<Problem> = Vec::new();
    let mut notes = Notes::default();
    let mut ignored_steps: BTreeSet<usize> = BTreeSet::new();
    let mut ignored_keys = 0usize;
    let (mut not_kept, mut golden_only) = (Vec::new(), Vec::new());
    let mut unrecognised: Vec<String> = Vec::new();
    let keys = dump.keys();

    for key in &keys {
        match key.as_str() {
            "tokens" | "continuation" => {
                match read_ids(&dump, key) {
                    Ok(ids) => {
                        if key == "tokens" {
                            out.tokens = Some(ids)
                        } else {
                            out.continuation = Some(ids)
                        }
                    }
                    Err(p) => problems.push(p),
                }
                continue;
            }
            "topk_ids" | "topk_values" | "lse" => {
                golden_only.push(key.clone());
                continue;
            }
            _ => {}
        }
        let Some(id) = TapId::parse_key(key) else {
            unrecognised.push(key.clone());
            continue;
        };
        let expected = if id.tap == "result_output" && id.step < view.logit_steps {
            // Logits: the golden may keep only their top 64 at decode steps; the engine's full row counts.
            Some(golden.shape(key).or_else(|| view.vocab.map(|v| vec![1, 1, 1, v])))
        } else if id.step > view.max_tap_step {
            ignored_steps.insert(id.step);
            ignored_keys += 1;
            None
        } else if view.keys.contains(key) {
            Some(golden.shape(key))
        } else if view.is_llama_name(&id) {
            not_kept.push(key.clone());
            None
        } else {
            unrecognised.push(key.clone());
            None
        };
        let Some(expected) = expected else { continue };
        match normalize(&dump, &id, expected.as_deref(), &view, &mut notes).and_then(|r| view.check_unshaped_logits(&id, r, expected.is_none())) {
            Ok((t, dtype)) => {
                out.stored.insert(key.clone(), dtype);
                out.tensors.insert(key.clone(), t);
            }
            Err(p) => problems.push(p),
        }
    }

    // Nothing recognised: the naming is wrong, say how.
    let data_keys = keys.len() - usize::from(out.tokens.is_some()) - usize::from(out.continuation.is_some());
    if out.tensors.is_empty() && problems.is_empty() {
        return Err(nothing_recognised(&path, data_keys, &unrecognised, not_kept.len() + ignored_keys, &view));
    }
    if !problems.is_empty() {
        return Err(first_problem(&path, problems, &view));
    }
    // Every step with taps needs its logits.
    for s in view.tap_steps.iter().copied() {
        let n = out.tensors.keys().filter(|k| TapId::parse_key(k).is_some_and(|t| t.step == s)).count();
        let logits = format!("s{s}/result_output");
        if n > 0 && !out.tensors.contains_key(&logits) {
            let near = unrecognised
                .iter()
                .find(|k| k.to_ascii_lowercase().contains("logit") || k.contains("output"))
                .map_or(String::new(), |k| format!(" (is `{k}` meant to be {logits}?)"));
            return Err(Error::DumpFile {
                path,
                problem: format!("step {s} has {n} taps but no {logits}: the logits are needed to judge a step"),
                hint: format!(
                    "dump the output head's result of every step as s{{k}}/result_output, shape [1, 1, 1, {}] (the last token's logits){near}",
                    view.vocab.map_or("n_vocab".into(), |v| v.to_string())
                ),
            });
        }
    }

    // Coverage.
    for t in &view.taps {
        if out.tensors.contains_key(&t.key()) {
            cov.compared += 1;
        } else {
            cov.not_dumped.push(t.key());
        }
    }
    cov.unknown = unrecognised.iter().map(|k| UnknownKey { key: k.clone(), nearest: nearest(k, &view) }).collect();
    cov.ignored_steps = ignored_steps.into_iter().collect();
    cov.logit_steps = out.logits().len();
    cov.notes = notes.finish(view.prompt_rows);
    if !cov.ignored_steps.is_empty() {
        cov.notes.push(format!(
            "step{} {} ignored ({ignored_keys} keys): the golden's taps stop at step {}",
            if cov.ignored_steps.len() == 1 { "" } else { "s" },
            join(&cov.ignored_steps, ", "),
            view.max_tap_step
        ));
    }
    if !not_kept.is_empty() {
        cov.notes.push(format!(
            "{} taps are llama.cpp names this golden does not keep (e.g. {}): not compared (golden/README.md, \"What is kept\")",
            not_kept.len(),
            not_kept[0]
        ));
    }
    if !golden_only.is_empty() {
        cov.notes.push(format!("{} ignored: these keys describe the golden's own run", golden_only.join(", ")));
    }
    let dumped_logits = out.tensors.keys().filter(|k| k.ends_with("/result_output")).count();
    if dumped_logits > cov.logit_steps {
        cov.notes.push(format!(
            "logits compared for steps 0..{} only: s{}/result_output is missing, and the steps after it are judged by their taps alone",
            cov.logit_steps, cov.logit_steps
        ));
    }
    if cov.logit_steps == 0 {
        cov.not_checked.push("logits".into());
        cov.notes.push("no s0/result_output: the logits were not checked".into());
    }
    if out.tokens.is_none() {
        cov.not_checked.push("tokens".into());
        cov.notes.push("no `tokens` key: the prompt's token ids were not checked (store them as `tokens`, i32 [n])".into());
    }
    if out.continuation.is_none() {
        cov.not_checked.push("diversity".into());
        cov.notes.push("no `continuation` key: the diversity gate on the engine's own greedy generation did not run".into());
    }
    Ok((out, cov))
}

/// What the golden offers, gathered once.
struct GoldenView {
    /// Every tap, graph order.
    taps: Vec<TapId>,
    keys: HashSet<String>,
    /// Graph-order index of each key.
    order: HashMap<String, usize>,
    tap_steps: BTreeSet<usize>,
    max_tap_step: usize,
    /// Steps whose logits the golden can judge (full or top-64).
    logit_steps: usize,
    /// Prompt length: rows of the prefill.
    prompt_rows: usize,
    vocab: Option<usize>,
    /// The largest id of the golden's top-64 lists + 1: a lower bound of the vocabulary.
    min_vocab: usize,
    /// (family, stage) pairs the golden uses anywhere, and its layer count.
    templates: HashSet<(String, Option<String>)>,
    n_layer: usize,
    /// Row-subset taps (src/rows.rs): key → the positions the golden keeps.
    rows: HashMap<String, Vec<usize>>,
}

impl GoldenView {
    fn new(golden: &TapsFile) -> Result<GoldenView> {
        let taps = golden.taps();
        let keys: HashSet<String> = taps.iter().map(|t| t.key()).collect();
        let order = taps.iter().enumerate().map(|(i, t)| (t.key(), i)).collect();
        let tap_steps: BTreeSet<usize> = taps.iter().map(|t| t.step).collect();
        let max_tap_step = tap_steps.iter().copied().max().unwrap_or(0);
        let logit_steps = match golden.shape("topk_ids") {
            Some(s) => s.first().copied().unwrap_or(0),
            None => (0..).take_while(|k| golden.contains(&format!("s{k}/result_output"))).count(),
        };
        let prompt_rows = match golden.shape("tokens") {
            Some(s) => s.iter().product(),
            None => golden.shape("s0/embd").and_then(|s| s.get(s.len().wrapping_sub(2)).copied()).unwrap_or(1),
        };
        let vocab = golden.shape("s0/result_output").and_then(|s| s.last().copied());
        let min_vocab = if golden.contains("topk_ids") { golden.ints("topk_ids")?.into_iter().max().map_or(0, |m| m.max(0) as usize + 1) } else { 0 };
        let templates = taps.iter().map(|t| (t.family.clone(), t.stage.clone())).collect();
        let n_layer = taps.iter().filter_map(|t| t.layer).max().map_or(0, |l| l + 1);
        let rows = crate::rows::all_positions(golden)?;
        Ok(GoldenView { taps, keys, order, tap_steps, max_tap_step, logit_steps, prompt_rows, vocab, min_vocab, templates, n_layer, rows })
    }

    /// A tap name llama.cpp's graph has (a family and stage the golden uses, a layer the model has)
    /// though this golden does not keep it at that step and layer.
    fn is_llama_name(&self, id: &TapId) -> bool {
        self.templates.contains(&(id.family.clone(), id.stage.clone())) && id.layer.is_none_or(|l| l < self.n_layer)
    }

    /// Logits the golden gives no shape for (no `s0/result_output` to take the vocabulary from): one
    /// row holding every id of the golden's top-64 lists.
    fn check_unshaped_logits(&self, id: &TapId, (t, dtype): (Tensor, Dtype), unshaped: bool) -> Result<(Tensor, Dtype), Problem> {
        let rows = squeeze_all(&t.shape).len();
        if !unshaped || (rows <= 1 && t.data.len() >= self.min_vocab) {
            return Ok((t, dtype));
        }
        Err(Problem {
            key: id.key(),
            problem: "logits of the wrong shape".into(),
            expected: format!("one row [1, 1, 1, n_vocab] with n_vocab ≥ {} (the golden's top-64 ids)", self.min_vocab),
            found: shape_str(&t.shape),
            hint: "store the last token's logits over the whole vocabulary".into(),
        })
    }

    fn rank(&self, key: &str) -> usize {
        self.order.get(key).copied().unwrap_or(usize::MAX)
    }
}

/// One tensor's problem, before it becomes an [`Error::DumpTensor`].
#[derive(Debug)]
struct Problem {
    key: String,
    problem: String,
    expected: String,
    found: String,
    hint: String,
}

fn first_problem(path: &Path, mut problems: Vec<Problem>, view: &GoldenView) -> Error {
    problems.sort_by_key(|p| (view.rank(&p.key), p.key.clone()));
    let first = problems.remove(0);
    let others = if problems.is_empty() {
        String::new()
    } else {
        let names: Vec<String> = problems.iter().take(5).map(|p| format!("{} ({})", p.key, p.problem)).collect();
        format!(
            " [and {} more tensor{} with problems: {}{}]",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
            names.join(", "),
            if problems.len() > 5 { ", …" } else { "" }
        )
    };
    Error::DumpTensor(Box::new(BadTensor {
        path: path.to_path_buf(),
        key: first.key,
        problem: first.problem,
        expected: first.expected,
        found: first.found,
        hint: first.hint,
        others,
    }))
}

fn nothing_recognised(path: &Path, n: usize, unrecognised: &[String], elsewhere: usize, view: &GoldenView) -> Error {
    let hf = unrecognised.iter().filter(|k| looks_like_hf(k)).count();
    if elsewhere > 0 {
        return Error::DumpFile {
            path: path.to_path_buf(),
            problem: format!(
                "nothing to compare: none of the {n} keys is a tap this golden holds ({elsewhere} are steps after its last, {}, or taps of layers it does not keep)",
                view.max_tap_step
            ),
            hint: format!("the golden holds steps 0..={} and {} taps; {NAMING}", view.max_tap_step, view.taps.len()),
        };
    }
    if n > 0 && hf * 2 >= unrecognised.len().max(1) {
        let example = unrecognised.iter().find(|k| looks_like_hf(k)).cloned().unwrap_or_default();
        return Error::DumpFile {
            path: path.to_path_buf(),
            problem: format!("0 of {n} keys recognised; keys look like Hugging Face module names: map them with the Python kit (python/lockstep_kit hf_names)"),
            hint: format!("`{example}` is a Hugging Face module name; {NAMING}"),
        };
    }
    let examples: Vec<String> = unrecognised.iter().take(3).map(|k| UnknownKey { key: k.clone(), nearest: nearest(k, view) }.to_string()).collect();
    Error::DumpFile {
        path: path.to_path_buf(),
        problem: if n == 0 { "the dump holds no tensors".into() } else { format!("0 of {n} keys recognised (e.g. {})", examples.join(", ")) },
        hint: NAMING.into(),
    }
}

/// Hugging Face transformers module or parameter names (`model.layers.0.self_attn.q_proj`, `lm_head`).
fn looks_like_hf(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    ["model.", "transformer.", "lm_head", "embed_tokens"].iter().any(|p| k.starts_with(p))
        || ["layers.", "self_attn", "mlp.", "layernorm", ".h.", "q_proj", "o_proj", "down_proj"].iter().any(|p| k.contains(p))
}

/// The nearest name the golden knows for an unknown dump key: a tap of the same step that extends the
/// name (`Qcur-0` → `Qcur-0.mul_mat`, graph order first), the same family and layer at another stage,
/// the key with its missing `s0/`, a common synonym, else the smallest edit distance (strsim).
pub fn nearest_known(key: &str, golden: &TapsFile) -> Option<String> {
    GoldenView::new(golden).ok().and_then(|v| nearest(key, &v))
}

fn nearest(key: &str, view: &GoldenView) -> Option<String> {
    let lower = key.to_ascii_lowercase();
    if let Some(id) = TapId::parse_key(key) {
        let step = if view.tap_steps.contains(&id.step) { id.step } else { 0 };
        let same_step: Vec<&TapId> = view.taps.iter().filter(|t| t.step == step).collect();
        let with = |t: &TapId| format!("s{}/{}", id.step, t.tap);
        if let Some(t) = same_step.iter().find(|t| t.tap.starts_with(&format!("{}.", id.tap))) {
            return Some(with(t));
        }
        if let Some(t) = same_step.iter().find(|t| t.family == id.family && t.layer == id.layer) {
            return Some(with(t));
        }
        if let Some(t) = same_step.iter().find(|t| t.tap.eq_ignore_ascii_case(&id.tap)) {
            return Some(with(t));
        }
        return same_step.iter().min_by_key(|t| strsim::levenshtein(&id.tap.to_ascii_lowercase(), &t.tap.to_ascii_lowercase())).map(|t| with(t));
    }
    if view.keys.contains(&format!("s0/{key}")) {
        return Some(format!("s0/{key}"));
    }
    if ["input_ids", "token_ids", "ids", "prompt_ids", "prompt_tokens", "token"].contains(&lower.as_str()) {
        return Some("tokens".into());
    }
    if lower.contains("logits") {
        return Some("s0/result_output".into());
    }
    let mut cands: Vec<String> = view.taps.iter().filter(|t| t.step == 0).map(|t| t.key()).collect();
    cands.extend(["tokens".to_string(), "continuation".to_string()]);
    cands.into_iter().min_by_key(|c| strsim::levenshtein(&lower, &c.to_ascii_lowercase()))
}

/// Normalizations seen, for the coverage notes.
#[derive(Default)]
struct Notes {
    /// dtype → (count, first key)
    dtypes: BTreeMap<String, (usize, String)>,
    /// (count, first key, found shape, golden shape)
    reshaped: Option<(usize, String, Vec<usize>, Vec<usize>)>,
    last_row: Option<(usize, String, Vec<usize>)>,
    /// Row-subset taps dumped whole and cut: positions kept → (count, first key, found shape, whole rows)
    rows_cut: BTreeMap<Vec<usize>, (usize, String, Vec<usize>, usize)>,
}

impl Notes {
    fn finish(self, prompt_rows: usize) -> Vec<String> {
        let mut out = Vec::new();
        for (d, (n, first)) in self.dtypes {
            let what = match d.as_str() {
                "F16" => "unit roundoff 2^-11 ≈ 4.9e-4, added to each tap's limit",
                "BF16" => "unit roundoff 2^-8 ≈ 3.9e-3, added to each tap's limit",
                "F64" => "unit roundoff 2^-53 ≈ 1.1e-16; read as f32, whose own rounding (6.0e-8) is below every limit",
                _ => "",
            };
            out.push(format!("{n} tensor{} stored {d} (e.g. {first}), converted to f32 ({what})", if n == 1 { "" } else { "s" }));
        }
        if let Some((n, k, found, golden)) = self.reshaped {
            out.push(format!(
                "{n} tensor{} reshaped by adding or dropping size-1 axes (same elements, same order), e.g. {k} {found:?} → {golden:?}",
                if n == 1 { "" } else { "s" }
            ));
        }
        if let Some((n, k, found)) = self.last_row {
            out.push(format!(
                "{n} prefill tap{} held all {prompt_rows} token rows where llama.cpp keeps only the last (last layer from ffn_inp on, norm, result_norm, result_output), e.g. {k} {found:?}: the last row is compared",
                if n == 1 { "" } else { "s" }
            ));
        }
        for (pos, (n, k, found, whole)) in self.rows_cut {
            out.push(format!(
                "{n} row-subset tap{} dumped whole (e.g. {k} {found:?}), cut to the rows the golden keeps: rows kept: {} ({} of {whole}; golden/README.md, \"Row-subset taps\")",
                if n == 1 { "" } else { "s" },
                crate::rows::fmt_positions(&pos),
                pos.len()
            ));
        }
        out
    }
}

fn numel(s: &[usize]) -> usize {
    s.iter().product()
}

fn squeeze_all(s: &[usize]) -> Vec<usize> {
    s.iter().copied().filter(|&d| d != 1).collect()
}

/// `s` without leading 1s, padded with leading 1s to 4-D (None above 4-D).
fn as4(s: &[usize]) -> Option<Vec<usize>> {
    let core: Vec<usize> = s.iter().copied().skip_while(|&d| d == 1).collect();
    (core.len() <= 4).then(|| {
        let mut v = vec![1; 4 - core.len()];
        v.extend(core);
        v
    })
}

fn shape_str(s: &[usize]) -> String {
    format!("{s:?}")
}

/// Reads one tap of the dump as f32 in the golden's shape `expected` (None: no golden shape known,
/// accepted as stored).
fn normalize(dump: &TapsFile, id: &TapId, expected: Option<&[usize]>, view: &GoldenView, notes: &mut Notes) -> Result<(Tensor, Dtype), Problem> {
    let key = id.key();
    let found = dump.shape(&key).unwrap_or_default();
    let dtype = dump.dtype(&key).unwrap_or(Dtype::F32);
    let exp_str = expected.map_or("a float tensor".to_string(), shape_str);
    let problem = |problem: String, expected: String, found: String, hint: String| Problem { key: key.clone(), problem, expected, found, hint };
    match dtype {
        Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64 => {}
        d @ (Dtype::BOOL | Dtype::U8 | Dtype::I8 | Dtype::I16 | Dtype::U16 | Dtype::I32 | Dtype::U32 | Dtype::I64 | Dtype::U64) => {
            return Err(problem(
                "integer dtype for a float tap".into(),
                format!("F32 (or F16/BF16/F64) {exp_str}"),
                format!("{d:?} {}", shape_str(&found)),
                "activations and logits are floating point: store them as float32; only `tokens` and `continuation` hold integers".into(),
            ))
        }
        d => {
            return Err(problem(
                "unsupported dtype".into(),
                format!("F32 (or F16/BF16/F64) {exp_str}"),
                format!("{d:?} {}", shape_str(&found)),
                "convert to float32 before saving (8-bit and smaller float formats are not read)".into(),
            ))
        }
    }
    if numel(&found) == 0 {
        return Err(problem(
            "empty tensor".into(),
            expected.map_or("a non-empty tensor".into(), |e| format!("{} ({} elements)", shape_str(e), numel(e))),
            format!("{} (0 elements)", shape_str(&found)),
            "the engine wrote no data for this tap: record it after it is computed, or leave the key out (a tap not dumped is reported as not dumped)".into(),
        ));
    }
    let read =
        |dump: &TapsFile| dump.f32(&key).map_err(|e| problem("unreadable".into(), exp_str.clone(), format!("{dtype:?} {}", shape_str(&found)), e.to_string()));
    if dtype != Dtype::F32 {
        let e = notes.dtypes.entry(format!("{dtype:?}")).or_insert((0, key.clone()));
        e.0 += 1;
    }
    let Some(g) = expected else {
        let t = read(dump)?;
        return Ok((t, dtype));
    };
    if found == g {
        return Ok((read(dump)?, dtype));
    }
    if numel(&found) == numel(g) && squeeze_all(&found) == squeeze_all(g) {
        let r = notes.reshaped.get_or_insert((0, key.clone(), found.clone(), g.to_vec()));
        r.0 += 1;
        let t = read(dump)?;
        return Ok((Tensor { shape: g.to_vec(), data: t.data }, dtype));
    }
    if let Some(pos) = view.rows.get(&key) {
        return whole_rows(dump, id, &found, g, pos, view, notes).map(|t| (t, dtype)).map_err(|(p, e, h)| problem(p, e, shape_str(&found), h));
    }
    // The prefill of the last layer with every row where the golden keeps the last one.
    let rows = view.prompt_rows;
    if id.step == 0 && rows > 1 && g.len() == 4 && g[..3] == [1, 1, 1] && as4(&found).as_deref() == Some(&[1, 1, rows, g[3]][..]) {
        let l = notes.last_row.get_or_insert((0, key.clone(), found.clone()));
        l.0 += 1;
        let t = read(dump)?;
        let w = g[3];
        return Ok((Tensor { shape: g.to_vec(), data: t.data[(rows - 1) * w..].to_vec() }, dtype));
    }
    let (p, h) = shape_problem(id, &found, g, view.prompt_rows);
    Err(problem(p, describe(id, g), shape_str(&found), h))
}

/// A row-subset tap (src/rows.rs) whose dump is not the golden's kept rows: the whole tap (up to size-1
/// axes), cut to the kept rows (noted); else the problem, the expected shapes and a hint.
fn whole_rows(
    dump: &TapsFile,
    id: &TapId,
    found: &[usize],
    g: &[usize],
    positions: &[usize],
    view: &GoldenView,
    notes: &mut Notes,
) -> Result<Tensor, (String, String, String)> {
    let key = id.key();
    let ax = token_axis(id, g);
    // The step's rows: the prompt at the prefill, one token at a decode step.
    let rows = if id.step == 0 { view.prompt_rows } else { 1 };
    let mut whole = g.to_vec();
    whole[ax] = rows;
    let kept = format!("{} rows at positions {}", positions.len(), crate::rows::fmt_positions(positions));
    let expected = format!("{} (the {kept}) or {} (the whole tap)", describe(id, g), shape_str(&whole));
    const HOW: &str = "dump the whole tap, or only the kept rows in ascending order (golden/README.md, \"Row-subset taps\")";
    let found4 = as4(found);
    if found4.as_deref() == Some(&whole[..]) {
        let t = dump.f32(&key).map_err(|e| ("unreadable".to_string(), expected.clone(), e.to_string()))?;
        let t =
            crate::rows::cut(id, Tensor { shape: whole.clone(), data: t.data }, g, positions).map_err(|e| ("cannot cut".to_string(), expected.clone(), e))?;
        let n = notes.rows_cut.entry(positions.to_vec()).or_insert((0, key.clone(), found.to_vec(), rows));
        n.0 += 1;
        return Ok(t);
    }
    if let Some(f4) = found4.filter(|f| f.len() == 4 && g.len() == 4 && (0..4).all(|a| a == ax || f[a] == g[a])) {
        return Err((
            format!("wrong number of rows ({}): neither the golden's {kept} nor the whole tap's {rows}", f4[ax]),
            expected,
            format!("the token axis is axis {ax}; {HOW}"),
        ));
    }
    let (p, h) = shape_problem(id, found, &whole, view.prompt_rows);
    Err((p, expected, format!("{h}; {HOW}")))
}

/// The golden shape with the meaning of its axes: `[1, 4, 9, 9] ([1, heads, tokens, kv_len])`.
fn describe(id: &TapId, g: &[usize]) -> String {
    let axes = match id.family.as_str() {
        "kq" | "kq_soft_max" => "[1, heads, tokens, kv_len]",
        "kqv" => "[1, heads, tokens, head_dim]",
        _ if id.stage.as_deref() == Some("rope") => "[1, tokens, heads, head_dim]",
        "result_output" => "[1, 1, tokens, n_vocab]",
        _ => "[1, 1, tokens, width]",
    };
    format!("{} = {axes}", shape_str(g))
}

/// What is wrong with a shape the golden's cannot be reached from by size-1 axes, and a layout hint.
fn shape_problem(id: &TapId, found: &[usize], g: &[usize], prompt_rows: usize) -> (String, String) {
    const README: &str = "shapes are ggml's ne reversed, always 4-D [ne3, ne2, ne1, ne0], row-major (golden/README.md)";
    let (sf, sg) = (squeeze_all(found), squeeze_all(g));
    let scores = matches!(id.family.as_str(), "kq" | "kq_soft_max" | "kqv");
    let rope = id.stage.as_deref() == Some("rope");
    if found.len() > 4 || found.is_empty() {
        return (
            format!("wrong rank ({}-D)", found.len()),
            format!("{README}; reshape to {} (row-major), without transposing if the order of elements already matches", shape_str(g)),
        );
    }
    if numel(found) != numel(g) {
        let f4 = as4(found).unwrap_or_default();
        let step_hint = if g.len() == 4 && f4.len() == 4 && f4[..3] == g[..3] && f4[3] != g[3] {
            if scores && id.family != "kqv" {
                format!(
                    "kv_len is {} here, the positions in use at step {} (llama.cpp pads its cache view; the padding is dropped): trim to the used positions",
                    g[3], id.step
                )
            } else {
                format!("width {} vs the golden's {}: another model or config, or a different projection?", f4[3], g[3])
            }
        } else if id.step == 0 && g.len() == 4 && !scores && !rope && g[2] == 1 && f4.len() == 4 && f4[2] != prompt_rows {
            format!("llama.cpp keeps 1 row here (the last token); {} rows is neither that nor the prompt's {prompt_rows}", f4[2])
        } else if id.step > 0 && f4.len() == 4 && !scores && !rope && f4[2] > 1 {
            format!("decode step {} feeds one token: 1 row (the step's logits are of that token)", id.step)
        } else {
            README.into()
        };
        return (format!("wrong element count ({} vs {})", numel(found), numel(g)), step_hint);
    }
    let mut a = sf.clone();
    let mut b = sg.clone();
    a.sort_unstable();
    b.sort_unstable();
    let permuted = a == b;
    let f4 = as4(found).unwrap_or_default();
    if scores && g.len() == 4 && f4 == [g[0], g[2], g[1], g[3]] {
        let last = if id.family == "kqv" { "head_dim" } else { "kv_len" };
        return (
            "axes in another order: tokens-first".into(),
            format!("{} is head-first [1, heads, tokens, {last}]; this looks like [1, tokens, heads, {last}]: permute(0, 2, 1, 3) (torch) / transpose(0, 2, 1, 3) (numpy) before saving", id.family),
        );
    }
    if rope && g.len() == 4 && f4 == [g[0], g[2], g[1], g[3]] {
        return (
            "axes in another order: heads-first".into(),
            "the RoPE output is tokens-first [1, tokens, heads, head_dim] (llama.cpp's layout before its permute): permute(0, 2, 1, 3) before saving".into(),
        );
    }
    if sf.len() == 2 && sg.len() == 2 && sf == [sg[1], sg[0]] {
        return (
            "transposed".into(),
            format!("one row per token: row-major [tokens, width] = {sg:?}; this is [width, tokens]: transpose before saving (x.T.contiguous() / np.ascontiguousarray(x.T))"),
        );
    }
    if permuted {
        return ("axes in another order".into(), format!("the golden's axes are {}: transpose (not reshape) to that order", describe(id, g)));
    }
    ("wrong shape (same element count)".into(), format!("{README}; if you merged or split axes, reshape to {} (row-major)", shape_str(g)))
}

/// Reads `tokens` or `continuation`: integer ids, 1-D up to size-1 axes.
fn read_ids(dump: &TapsFile, key: &str) -> Result<Vec<u32>, Problem> {
    let shape = dump.shape(key).unwrap_or_default();
    let dtype = dump.dtype(key).unwrap_or(Dtype::I32);
    let p = |problem: &str, hint: &str| Problem {
        key: key.into(),
        problem: problem.into(),
        expected: "I32 (or I64) [n]".into(),
        found: format!("{dtype:?} {}", shape_str(&shape)),
        hint: hint.into(),
    };
    let ints = match dtype {
        Dtype::I32 | Dtype::I64 => dump.ints(key).map_err(|e| p("unreadable", &e.to_string()))?,
        Dtype::U32 | Dtype::U16 | Dtype::U8 | Dtype::I16 | Dtype::I8 | Dtype::U64 => {
            return Err(p("unsupported integer dtype", "store token ids as int32 (np.int32 / torch.int32)"));
        }
        _ => return Err(p("token ids stored as a non-integer dtype", "store token ids as int32 (np.int32 / torch.int32)")),
    };
    if squeeze_all(&shape).len() > 1 {
        return Err(p("wrong rank", "token ids are one flat list [n] (a batch of one prompt)"));
    }
    if let Some(bad) = ints.iter().find(|&&v| v < 0 || v > u32::MAX as i64) {
        return Err(p(&format!("token id {bad} out of range"), "token ids are vocabulary indices ≥ 0"));
    }
    Ok(ints.into_iter().map(|v| v as u32).collect())
}

/// Checks the container before it is mapped: the safetensors header length, JSON and every tensor's
/// declared size against the file, so that a truncated file, another format or a header claiming a huge
/// shape get their own message.
fn check_container(path: &Path, golden: &TapsFile) -> Result<()> {
    let bad = |problem: String, hint: &str| Error::DumpFile { path: path.to_path_buf(), problem, hint: hint.into() };
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    const WRITE: &str = "write the dump with the safetensors library (safetensors.numpy.save_file / safetensors.torch.save_file, or the Python kit)";
    const ATOMIC: &str = "the writer did not finish, or the copy was cut short: write to a temporary file and rename it when done";
    if len < 8 {
        return Err(bad(format!("not a safetensors file: {len} bytes, shorter than the 8-byte header length it starts with"), WRITE));
    }
    let mut head = [0u8; 8];
    f.read_exact(&mut head).map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(head);
    let other_format = sniff(&head);
    if let Some(kind) = other_format {
        if n > 100_000_000 || n.saturating_add(8) > len {
            return Err(bad(format!("not a safetensors file: it looks like {kind}"), WRITE));
        }
    }
    if n > 100_000_000 {
        return Err(bad(format!("not a safetensors file: its first 8 bytes give a header length of {n} bytes (safetensors allows 100 MB)"), WRITE));
    }
    if n.saturating_add(8) > len {
        return Err(bad(format!("truncated file: the header is {n} bytes long but only {} bytes follow the length field", len - 8), ATOMIC));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let text = std::str::from_utf8(&header).map_err(|_| bad("not a safetensors file: its header is not UTF-8 text".into(), WRITE))?;
    if !text.trim_start().starts_with('{') {
        return Err(bad("not a safetensors file: its header is not a JSON object".into(), WRITE));
    }
    let json: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(format!("not a safetensors file: its header is not valid JSON ({e})"), WRITE))?;
    let Some(obj) = json.as_object() else { return Err(bad("not a safetensors file: its header is not a JSON object".into(), WRITE)) };
    let data_len = (len - 8 - n) as u128;
    let mut past_end: Option<(String, u128)> = None;
    for (name, info) in obj.iter().filter(|(k, _)| *k != "__metadata__") {
        let dtype = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
        let bytes_per = match dtype {
            "F64" | "I64" | "U64" => 8u128,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            _ => 1,
        };
        let shape: Vec<u128> =
            info.get("shape").and_then(|s| s.as_array()).map_or(Vec::new(), |a| a.iter().filter_map(|v| v.as_u64()).map(u128::from).collect());
        let elements = shape.iter().try_fold(1u128, |acc, &d| acc.checked_mul(d));
        let bytes = elements.and_then(|e| e.checked_mul(bytes_per));
        if bytes.is_none_or(|b| b > len as u128) {
            return Err(Error::DumpTensor(Box::new(BadTensor {
                path: path.to_path_buf(),
                key: name.clone(),
                problem: "the header claims a huge shape".into(),
                expected: golden.shape(name).map_or(format!("a shape whose data fits in the file ({len} bytes)"), |s| shape_str(&s)),
                found: format!(
                    "{dtype} {shape:?} = {} elements{}, in a file of {len} bytes",
                    elements.map_or("more than 2^128".into(), |e| e.to_string()),
                    bytes.map_or(String::new(), |b| format!(" ({b} bytes)"))
                ),
                hint: "the header is corrupt, or the writer took a shape from uninitialised memory".into(),
                others: String::new(),
            })));
        }
        let end = info.get("data_offsets").and_then(|o| o.as_array()).and_then(|o| o.get(1)).and_then(|v| v.as_u64()).unwrap_or(0) as u128;
        if end > data_len && past_end.as_ref().is_none_or(|(_, e)| end > *e) {
            past_end = Some((name.clone(), end));
        }
    }
    if let Some((name, end)) = past_end {
        return Err(bad(
            format!(
                "truncated file: the header places tensor data up to byte {end} (the last is {name}), but the file holds {data_len} bytes of data ({} missing)",
                end - data_len
            ),
            ATOMIC,
        ));
    }
    Ok(())
}

/// Another well-known format, from its first bytes.
fn sniff(head: &[u8; 8]) -> Option<&'static str> {
    if head.starts_with(b"GGUF") {
        Some("a GGUF model file")
    } else if head.starts_with(b"PK\x03\x04") {
        Some("a zip archive (torch.save writes one): save with safetensors.torch.save_file instead")
    } else if head[0] == 0x80 && head[1] <= 5 {
        Some("a Python pickle (torch.save / pickle.dump): save with safetensors.torch.save_file instead")
    } else if head.starts_with(b"\x93NUMPY") {
        Some("a NumPy .npy file: save with safetensors.numpy.save_file instead")
    } else if head.starts_with(b"\x89HDF") {
        Some("an HDF5 file")
    } else if head.iter().all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace()) {
        Some("a text file")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_by_size_one_axes_and_hints() {
        assert_eq!(as4(&[9, 256]), Some(vec![1, 1, 9, 256]));
        assert_eq!(as4(&[1, 2, 1, 3, 4]), Some(vec![2, 1, 3, 4]));
        assert_eq!(squeeze_all(&[1, 4, 1, 10]), vec![4, 10]);
        let kq = TapId::parse_key("s0/kq-0").unwrap();
        let (p, h) = shape_problem(&kq, &[1, 9, 4, 9], &[1, 4, 9, 9], 9);
        assert!(p.contains("tokens-first") && h.contains("permute(0, 2, 1, 3)"), "{p} {h}");
        let (p, _) = shape_problem(&kq, &[1, 4, 9, 16], &[1, 4, 9, 9], 9);
        assert!(p.contains("element count"), "{p}");
        let embd = TapId::parse_key("s0/embd").unwrap();
        let (p, h) = shape_problem(&embd, &[256, 9], &[1, 1, 9, 256], 9);
        assert!(p == "transposed" && h.contains("[9, 256]"), "{p} {h}");
        let (p, _) = shape_problem(&embd, &[1, 1, 1, 9, 256, 1], &[1, 1, 9, 256], 9);
        assert!(p.contains("rank"), "{p}");
    }

    #[test]
    fn logits_without_a_golden_shape_must_cover_the_top_ids() {
        use crate::golden::write_safetensors;
        let dir = tempfile::tempdir().unwrap();
        let g = dir.path().join("golden.safetensors");
        let act = |k: &str, rows: usize| (k.to_string(), vec![1, 1, rows, 3], vec![0.5f32; rows * 3]);
        write_safetensors(
            &g,
            &[act("s0/embd", 2), act("s0/l_out-0", 2), act("s1/embd", 1), act("s1/l_out-0", 1)],
            &[("topk_ids".into(), vec![2, 2], vec![5, 7, 1, 2]), ("tokens".into(), vec![2], vec![3, 4])],
        )
        .unwrap();
        let golden = TapsFile::open(&g).unwrap();
        let d = dir.path().join("dump.safetensors");
        write_safetensors(&d, &[act("s0/embd", 2), ("s0/result_output".into(), vec![1, 1, 1, 4], vec![0.0; 4])], &[]).unwrap();
        let e = load(&d, &golden).unwrap_err().to_string();
        assert!(e.contains("s0/result_output") && e.contains("n_vocab ≥ 8") && e.contains("[1, 1, 1, 4]"), "{e}");
        write_safetensors(
            &d,
            &[
                act("s0/embd", 2),
                ("s0/result_output".into(), vec![1, 1, 1, 8], vec![0.0; 8]),
                act("s1/embd", 1),
                ("s1/result_output".into(), vec![8], vec![0.0; 8]),
            ],
            &[("tokens".into(), vec![2], vec![3, 4])],
        )
        .unwrap();
        let (dump, cov) = load(&d, &golden).unwrap();
        assert_eq!((cov.compared, cov.logit_steps), (2, 2));
        assert_eq!(cov.not_dumped, vec!["s0/l_out-0".to_string(), "s1/l_out-0".to_string()]);
        assert_eq!(cov.not_checked, vec!["diversity".to_string()]);
        assert_eq!(dump.logits().len(), 2);
    }

    #[test]
    fn formats_are_recognised() {
        assert!(sniff(b"GGUF\x03\0\0\0").unwrap().contains("GGUF"));
        assert!(sniff(b"PK\x03\x04\0\0\0\0").unwrap().contains("zip"));
        assert!(sniff(b"hello wo").unwrap().contains("text"));
        assert!(sniff(&[0x40, 0, 0, 0, 0, 0, 0, 0]).is_none());
        assert!(looks_like_hf("model.layers.0.self_attn.q_proj") && looks_like_hf("lm_head") && !looks_like_hf("s0/Qcur-0.rope"));
    }
}
