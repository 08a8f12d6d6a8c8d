//! `lockstep merge-shards`: per-rank dumps of a tensor-parallel engine merged back into one dump.
//!
//! The rank files are made here by splitting an unsplit dump the way a Megatron-style engine splits
//! its work (attention heads and K/V heads over the ranks, FFN and vocabulary columns, replicated
//! residual stream, partial sums of row-parallel projections), with index arithmetic written
//! independently of src/shards.rs; merging them must give the unsplit dump back byte for byte.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use lockstep::shards::{merge_files, MergeError, Rule, ShardSpec};
use lockstep::tapname::TapId;
use lockstep_engine::taps_file::SafetensorsTapWriter;

/// One tensor: 4-D shape and row-major values.
type Tensor = ([usize; 4], Vec<f32>);

/// A dump in memory: tap key (`s0/kq-1`) → tensor, plus tokens.
#[derive(Clone, Debug, PartialEq)]
struct Dump {
    taps: BTreeMap<String, Tensor>,
    tokens: Vec<u32>,
}

impl Dump {
    fn write(&self, path: &Path) {
        let mut w = SafetensorsTapWriter::new(path).unwrap();
        for (k, (shape, v)) in &self.taps {
            let t = TapId::parse_key(k).unwrap();
            w.record(t.step, &t.tap, *shape, v).unwrap();
        }
        w.set_tokens(&self.tokens).unwrap();
        w.finish().unwrap();
    }

    fn read(path: &Path) -> Dump {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut taps = BTreeMap::new();
        let mut tokens = Vec::new();
        for (k, t) in st.tensors() {
            let le4 = |c: &[u8]| [c[0], c[1], c[2], c[3]];
            if k == "tokens" {
                tokens = t.data().chunks_exact(4).map(|c| i32::from_le_bytes(le4(c)) as u32).collect();
            } else {
                assert_eq!(t.dtype(), safetensors::Dtype::F32, "{k}");
                let s = t.shape();
                taps.insert(k, ([s[0], s[1], s[2], s[3]], t.data().chunks_exact(4).map(|c| f32::from_le_bytes(le4(c))).collect()));
            }
        }
        Dump { taps, tokens }
    }
}

/// How the synthetic engine splits a tap over the ranks.
#[derive(Clone, Copy, Debug)]
enum Split {
    /// On `axis`, in units of `unit` elements per query head.
    Heads {
        axis: usize,
        unit: usize,
    },
    /// On `axis`, in units of `unit` elements per KV head.
    KvHeads {
        axis: usize,
        unit: usize,
    },
    /// The FFN's columns (axis 3).
    Ffn,
    /// The vocabulary (axis 3).
    Vocab,
    Replicated,
    /// Each rank holds value / ranks (exact for a power-of-two rank count and dyadic values).
    Partial,
}

const HEADS: usize = 8;
const KV_HEADS: usize = 4;
const HEAD_DIM: usize = 2;
const EMBD: usize = 16;
const FF: usize = 12;
const VOCAB: usize = 20;
const LAYERS: usize = 2;

/// Dyadic pseudo-random values (k/256 with |k| ≤ 1000), so halves and quarters are exact in f32.
fn values(key: &str, n: usize) -> Vec<f32> {
    let mut h: u64 = key.bytes().fold(0xcbf29ce484222325, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    (0..n)
        .map(|_| {
            h = h.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((h >> 33) % 2001) as f32 / 256.0 - 1000.0 / 256.0
        })
        .collect()
}

/// The unsplit dump of a qwen2-like model (2 layers, GQA 8/4 heads) over a 3-token prefill and one
/// decode step, with how each tap is split.
fn synthetic() -> (Dump, BTreeMap<String, Split>) {
    let mut taps = BTreeMap::new();
    let mut how = BTreeMap::new();
    for (step, t, kv) in [(0usize, 3usize, 3usize), (1, 1, 4)] {
        let mut add = |name: String, shape: [usize; 4], split: Split| {
            let key = format!("s{step}/{name}");
            taps.insert(key.clone(), (shape, values(&key, shape.iter().product())));
            how.insert(key, split);
        };
        add("embd".into(), [1, 1, t, EMBD], Split::Replicated);
        for l in 0..LAYERS {
            add(format!("attn_norm-{l}"), [1, 1, t, EMBD], Split::Replicated);
            add(format!("norm-{l}.rms_norm.0"), [1, 1, t, EMBD], Split::Replicated);
            for stage in ["mul_mat", "add"] {
                add(format!("Qcur-{l}.{stage}"), [1, 1, t, HEADS * HEAD_DIM], Split::Heads { axis: 3, unit: HEAD_DIM });
                add(format!("Kcur-{l}.{stage}"), [1, 1, t, KV_HEADS * HEAD_DIM], Split::KvHeads { axis: 3, unit: HEAD_DIM });
                add(format!("Vcur-{l}.{stage}"), [1, 1, t, KV_HEADS * HEAD_DIM], Split::KvHeads { axis: 3, unit: HEAD_DIM });
            }
            add(format!("Qcur-{l}.rope"), [1, t, HEADS, HEAD_DIM], Split::Heads { axis: 2, unit: 1 });
            add(format!("Kcur-{l}.rope"), [1, t, KV_HEADS, HEAD_DIM], Split::KvHeads { axis: 2, unit: 1 });
            add(format!("kq-{l}"), [1, HEADS, t, kv], Split::Heads { axis: 1, unit: 1 });
            add(format!("kq_soft_max-{l}"), [1, HEADS, t, kv], Split::Heads { axis: 1, unit: 1 });
            add(format!("kqv-{l}"), [1, HEADS, t, HEAD_DIM], Split::Heads { axis: 1, unit: 1 });
            add(format!("kqv_out-{l}"), [1, 1, t, HEADS * HEAD_DIM], Split::Heads { axis: 3, unit: HEAD_DIM });
            add(format!("attn_out-{l}"), [1, 1, t, EMBD], Split::Partial);
            add(format!("ffn_inp-{l}"), [1, 1, t, EMBD], Split::Replicated);
            add(format!("norm-{l}.rms_norm.1"), [1, 1, t, EMBD], Split::Replicated);
            add(format!("ffn_gate-{l}"), [1, 1, t, FF], Split::Ffn);
            add(format!("ffn_up-{l}"), [1, 1, t, FF], Split::Ffn);
            add(format!("ffn_swiglu-{l}"), [1, 1, t, FF], Split::Ffn);
            add(format!("ffn_out-{l}"), [1, 1, t, EMBD], Split::Partial);
            add(format!("l_out-{l}"), [1, 1, t, EMBD], Split::Replicated);
        }
        add("result_norm".into(), [1, 1, 1, EMBD], Split::Replicated);
        add("result_output".into(), [1, 1, 1, VOCAB], Split::Vocab);
    }
    (Dump { taps, tokens: vec![9707, 11, 1879] }, how)
}

/// The spec for `synthetic`'s split (with the sums).
const SYNTH_SPEC: &str = r#"
[taps]
embd = "replicated"
attn_norm = "replicated"
norm = "replicated"
Qcur = 3
Kcur = 3
Vcur = 3
"Qcur.rope" = 2
"Kcur.rope" = 2
kq = 1
kq_soft_max = 1
kqv = 1
kqv_out = 3
attn_out = "sum"
ffn_inp = "replicated"
ffn_gate = 3
ffn_up = 3
ffn_swiglu = 3
ffn_out = "sum"
l_out = "replicated"
result_norm = "replicated"
result_output = 3
"#;

/// `n` items over `ranks`, the first ranks one larger when it does not divide.
fn shares(n: usize, ranks: usize) -> Vec<usize> {
    (0..ranks).map(|r| n / ranks + usize::from(r < n % ranks)).collect()
}

/// Cuts `t` on `axis` into consecutive pieces of the given lengths, element by element.
fn cut(t: &Tensor, axis: usize, lens: &[usize]) -> Vec<Tensor> {
    let (shape, v) = t;
    assert_eq!(lens.iter().sum::<usize>(), shape[axis]);
    let mut pieces: Vec<Tensor> = lens
        .iter()
        .map(|&len| {
            let mut s = *shape;
            s[axis] = len;
            (s, Vec::new())
        })
        .collect();
    let strides = [shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1];
    for (flat, &x) in v.iter().enumerate() {
        let coord = (flat / strides[axis]) % shape[axis];
        let (mut piece, mut start) = (0, 0);
        while coord >= start + lens[piece] {
            start += lens[piece];
            piece += 1;
        }
        pieces[piece].1.push(x);
    }
    pieces
}

/// Splits the unsplit dump into `ranks` rank dumps.
fn split(full: &Dump, how: &BTreeMap<String, Split>, ranks: usize) -> Vec<Dump> {
    let mut out = vec![Dump { taps: BTreeMap::new(), tokens: full.tokens.clone() }; ranks];
    for (k, t) in &full.taps {
        let pieces: Vec<Tensor> = match how[k] {
            Split::Heads { axis, unit } => cut(t, axis, &shares(HEADS, ranks).iter().map(|h| h * unit).collect::<Vec<_>>()),
            Split::KvHeads { axis, unit } => cut(t, axis, &shares(KV_HEADS, ranks).iter().map(|h| h * unit).collect::<Vec<_>>()),
            Split::Ffn => cut(t, 3, &shares(FF, ranks)),
            Split::Vocab => cut(t, 3, &shares(VOCAB, ranks)),
            Split::Replicated => vec![t.clone(); ranks],
            Split::Partial => vec![(t.0, t.1.iter().map(|x| x / ranks as f32).collect()); ranks],
        };
        for (r, p) in pieces.into_iter().enumerate() {
            out[r].taps.insert(k.clone(), p);
        }
    }
    out
}

fn write_ranks(dir: &Path, ranks: &[Dump]) -> Vec<PathBuf> {
    ranks
        .iter()
        .enumerate()
        .map(|(r, d)| {
            let p = dir.join(format!("rank{r}.safetensors"));
            d.write(&p);
            p
        })
        .collect()
}

fn spec(text: &str) -> ShardSpec {
    ShardSpec::parse(text, Path::new("tp.toml")).unwrap()
}

#[test]
fn tensor_parallel_ranks_merge_back_to_the_unsplit_dump() {
    let (full, how) = synthetic();
    let dir = tempfile::tempdir().unwrap();
    let unsplit = dir.path().join("unsplit.safetensors");
    full.write(&unsplit);
    // 2 and 4 ranks divide everything; 3 ranks split unevenly (heads 3/3/2, KV heads 2/1/1, vocab 7/7/6):
    // the partial sums are not exact thirds, so 3 ranks use a spec where attn_out/ffn_out are replicated.
    for ranks in [2usize, 4, 3] {
        let mut how = how.clone();
        let mut text = SYNTH_SPEC.to_string();
        if ranks == 3 {
            how.values_mut().filter(|s| matches!(s, Split::Partial)).for_each(|s| *s = Split::Replicated);
            text = text.replace("\"sum\"", "\"replicated\"");
        }
        let rank_dumps = split(&full, &how, ranks);
        assert_ne!(rank_dumps[0].taps["s0/kq-1"].0, full.taps["s0/kq-1"].0, "the ranks hold slices");
        let sub = dir.path().join(format!("tp{ranks}"));
        std::fs::create_dir(&sub).unwrap();
        let files = write_ranks(&sub, &rank_dumps);
        let merged = sub.join("merged.safetensors");
        let s = merge_files(&spec(&text), &files, &merged).unwrap();
        assert_eq!(Dump::read(&merged), full, "{ranks} ranks");
        assert_eq!(std::fs::read(&merged).unwrap(), std::fs::read(&unsplit).unwrap(), "{ranks} ranks: byte for byte");
        let per_step_split = LAYERS * (6 + 2 + 4 + 3) + 1; // Q/K/V ×2 stages, 2 ropes, kq kq_soft_max kqv kqv_out, ffn ×3; result_output
        let per_step_sum = if ranks == 3 { 0 } else { LAYERS * 2 };
        assert_eq!((s.ranks, s.split, s.summed, s.other), (ranks, 2 * per_step_split, 2 * per_step_sum, 1));
        assert_eq!(s.split + s.summed + s.replicated, full.taps.len());
        assert_eq!(s.max_replicated_diff, 0.0);
        assert!(s.unused_patterns.is_empty(), "{:?}", s.unused_patterns);
    }
}

/// The ```toml block of docs/shards.md's "Example spec" section.
fn documented_spec() -> String {
    // beside Cargo.toml, or under the working directory (a test binary run from a copied checkout)
    let doc = [Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/shards.md"), PathBuf::from("docs/shards.md")]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .expect("docs/shards.md beside Cargo.toml or in the working directory");
    let section = doc.split_once("## Example spec").expect("docs/shards.md has an `## Example spec` section").1;
    let block = section.split_once("```toml\n").expect("a ```toml block in it").1;
    block.split_once("```").expect("the block is closed").0.to_string()
}

#[test]
fn the_documented_spec_merges_real_engine_dumps_of_both_architectures() {
    let text = documented_spec();
    let spec = ShardSpec::parse(&text, Path::new("docs/shards.md")).expect("the documented spec parses");
    let dir = tempfile::tempdir().unwrap();
    let mut unused_everywhere: Option<Vec<String>> = None;
    for model in ["tiny-qwen2", "tiny-llama"] {
        let m = lockstep_engine::model::Model::open_path(lockstep::golden::default_dir().join(format!("models/{model}.f32.gguf"))).unwrap();
        let ids = m.prompt_tokens(&lockstep_engine::model::Prompt::Text("The quick brown fox".into())).unwrap();
        let mut backend = lockstep_engine::cpu::CpuBackend::load(&m.file, Default::default()).unwrap();
        let engine_dump = dir.path().join(format!("{model}.safetensors"));
        lockstep_engine::dump::dump(&mut backend, &ids, 2, &engine_dump).unwrap();

        // split the engine's dump in two by the documented rules (the rule says which axis; halves)
        let bytes = std::fs::read(&engine_dump).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut ranks: Vec<(BTreeMap<String, Tensor>, SafetensorsTapWriter)> =
            (0..2).map(|r| (BTreeMap::new(), SafetensorsTapWriter::new(dir.path().join(format!("{model}.rank{r}.safetensors"))).unwrap())).collect();
        let (mut n_split, mut n_repl) = (0, 0);
        for (k, t) in st.tensors() {
            let Some(tap) = TapId::parse_key(&k) else {
                let ids: Vec<i32> = t.data().chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                for (_, w) in &mut ranks {
                    w.set_i32(&k, t.shape().to_vec(), &ids).unwrap();
                }
                continue;
            };
            let s = t.shape();
            let tensor: Tensor = ([s[0], s[1], s[2], s[3]], t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect());
            let (rule, _) = spec.rule_for(&tap).unwrap_or_else(|| panic!("docs/shards.md's spec has no rule for {k}"));
            let pieces = match rule {
                Rule::Split(axis) => {
                    n_split += 1;
                    cut(&tensor, axis, &shares(tensor.0[axis], 2))
                }
                Rule::Replicated => {
                    n_repl += 1;
                    vec![tensor.clone(), tensor.clone()]
                }
                Rule::Sum => panic!("the documented spec has no sums"),
            };
            for ((taps, w), p) in ranks.iter_mut().zip(pieces) {
                w.record(tap.step, &tap.tap, p.0, &p.1).unwrap();
                taps.insert(k.clone(), p);
            }
        }
        assert!(n_split > 20 && n_repl > 20, "{model}: {n_split} split, {n_repl} replicated");
        let files: Vec<PathBuf> = ranks
            .into_iter()
            .map(|(_, w)| {
                let p = w.path().to_path_buf();
                w.finish().unwrap();
                p
            })
            .collect();
        let merged = dir.path().join(format!("{model}.merged.safetensors"));
        let s = merge_files(&spec, &files, &merged).unwrap();
        assert_eq!(std::fs::read(&merged).unwrap(), bytes, "{model}: merging the two ranks gives the engine's dump back, byte for byte");
        assert_eq!((s.split, s.replicated, s.other), (n_split, n_repl, 2), "{model}");
        unused_everywhere = Some(match unused_everywhere {
            None => s.unused_patterns,
            Some(prev) => prev.into_iter().filter(|p| s.unused_patterns.contains(p)).collect(),
        });
    }
    assert_eq!(unused_everywhere.unwrap(), Vec::<String>::new(), "every documented pattern matches a tap of qwen2 or llama");
}

#[test]
fn a_replicated_tap_the_ranks_disagree_on_is_named_with_the_gap() {
    let (full, how) = synthetic();
    let mut ranks = split(&full, &how, 2);
    let v = &mut ranks[1].taps.get_mut("s1/l_out-0").unwrap().1;
    v[5] += 1.0 / 1024.0;
    let dir = tempfile::tempdir().unwrap();
    let files = write_ranks(dir.path(), &ranks);
    let out = dir.path().join("merged.safetensors");
    let e = merge_files(&spec(SYNTH_SPEC), &files, &out).unwrap_err();
    match &e {
        MergeError::Disagree { key, rank, max_abs, index, .. } => {
            assert_eq!((key.as_str(), *rank, index.as_slice()), ("s1/l_out-0", 1, &[0, 0, 0, 5][..]));
            assert!((max_abs - 1.0 / 1024.0).abs() < 1e-9, "{max_abs}");
        }
        other => panic!("expected Disagree, got {other}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("rank1.safetensors") && msg.contains("9.766e-4") && msg.contains("[0, 0, 0, 5]"), "{msg}");
    assert!(!out.exists(), "nothing written on error");

    // a tolerance lets it through; the merged dump holds rank 0's copy
    let s = merge_files(&spec(&format!("tolerance = 1e-3\n{SYNTH_SPEC}")), &files, &out).unwrap();
    assert_eq!(s.max_replicated_diff, 1.0 / 1024.0);
    assert_eq!(Dump::read(&out).taps["s1/l_out-0"], full.taps["s1/l_out-0"]);

    // NaN on one rank only is an infinite gap
    let mut ranks = split(&full, &how, 2);
    ranks[1].taps.get_mut("s0/embd").unwrap().1[0] = f32::NAN;
    let files = write_ranks(dir.path(), &ranks);
    let e = merge_files(&spec(&format!("tolerance = 1e30\n{SYNTH_SPEC}")), &files, &out).unwrap_err();
    assert!(matches!(&e, MergeError::Disagree { key, max_abs, .. } if key == "s0/embd" && max_abs.is_infinite()), "{e}");
}

#[test]
fn a_tap_missing_on_one_rank_is_named() {
    let (full, how) = synthetic();
    let mut ranks = split(&full, &how, 3);
    ranks[1].taps.remove("s0/kq-0");
    ranks[2].taps.remove("s1/ffn_up-1");
    let dir = tempfile::tempdir().unwrap();
    let files = write_ranks(dir.path(), &ranks);
    let e = merge_files(&spec(SYNTH_SPEC), &files, &dir.path().join("m.safetensors")).unwrap_err();
    let msg = e.to_string();
    match &e {
        MergeError::MissingTap { key, .. } => assert_eq!(key, "s0/kq-0"),
        other => panic!("expected MissingTap, got {other}"),
    }
    assert!(
        msg.contains("present on rank 0 (") && msg.contains("rank 2 (") && msg.contains("missing on rank 1 (") && msg.contains("rank1.safetensors"),
        "{msg}"
    );
    assert!(msg.contains("1 more keys are missing on some rank: s1/ffn_up-1"), "{msg}");
}

#[test]
fn slices_that_do_not_concatenate_are_named() {
    let (full, how) = synthetic();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.safetensors");

    // a rank that dumped ffn_gate with one token fewer
    let mut ranks = split(&full, &how, 2);
    let t = ranks[1].taps.get_mut("s0/ffn_gate-0").unwrap();
    t.0[2] -= 1;
    t.1.truncate(t.0.iter().product());
    let files = write_ranks(dir.path(), &ranks);
    let e = merge_files(&spec(SYNTH_SPEC), &files, &out).unwrap_err();
    assert!(matches!(&e, MergeError::NotConcatenable { key, rule: Rule::Split(3), .. } if key == "s0/ffn_gate-0"), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("rank 1 differs from rank 0 on axis 2 (2 vs 3)") && msg.contains("[1, 1, 2, 6]") && msg.contains("[1, 1, 3, 6]"), "{msg}");

    // a rank that dumped its attention scores tokens-first ([1, T, heads, kv] instead of [1, heads, T, kv])
    let mut ranks = split(&full, &how, 2);
    let t = ranks[1].taps.get_mut("s0/kq-1").unwrap();
    t.0 = [1, t.0[2], t.0[1], t.0[3]];
    let files = write_ranks(dir.path(), &ranks);
    let e = merge_files(&spec(SYNTH_SPEC), &files, &out).unwrap_err();
    assert!(matches!(&e, MergeError::NotConcatenable { key, .. } if key == "s0/kq-1"), "{e}");

    // a summed tap whose partials differ in shape
    let mut ranks = split(&full, &how, 2);
    let t = ranks[0].taps.get_mut("s0/attn_out-0").unwrap();
    t.0 = [1, 1, 1, t.1.len()];
    let files = write_ranks(dir.path(), &ranks);
    let e = merge_files(&spec(SYNTH_SPEC), &files, &out).unwrap_err();
    assert!(matches!(&e, MergeError::NotConcatenable { key, rule: Rule::Sum, .. } if key == "s0/attn_out-0"), "{e}");
}

#[test]
fn a_tap_without_a_rule_is_an_error_unless_the_spec_has_a_default() {
    let (full, how) = synthetic();
    let dir = tempfile::tempdir().unwrap();
    let files = write_ranks(dir.path(), &split(&full, &how, 2));
    let out = dir.path().join("m.safetensors");
    let text = SYNTH_SPEC.replace("\nnorm = \"replicated\"\n", "\n");
    let e = merge_files(&spec(&text), &files, &out).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(&e, MergeError::NoRule { key, .. } if key == "s0/norm-0.rms_norm.0"), "{msg}");
    assert!(msg.contains("tp.toml") && msg.contains(r#"tried "norm.rms_norm.0", "norm.rms_norm", "norm""#), "{msg}");
    merge_files(&spec(&format!("default = \"replicated\"\n{text}")), &files, &out).unwrap();
    assert_eq!(Dump::read(&out), full);
}

#[test]
fn rule_lookup_prefers_the_most_specific_pattern() {
    let s = spec("default = \"sum\"\n[taps]\nnorm = \"replicated\"\n\"norm.rms_norm\" = 3\n\"norm.rms_norm.1\" = 2\nQcur = 3\n\"Qcur.rope\" = 2\n");
    let rule = |k: &str| s.rule_for(&TapId::parse_key(k).unwrap()).map(|(r, p)| (r, p.map(String::from)));
    assert_eq!(rule("s0/norm-3.rms_norm.1"), Some((Rule::Split(2), Some("norm.rms_norm.1".into()))));
    assert_eq!(rule("s0/norm-3.rms_norm.0"), Some((Rule::Split(3), Some("norm.rms_norm".into()))));
    assert_eq!(rule("s2/norm"), Some((Rule::Replicated, Some("norm".into()))));
    assert_eq!(rule("s0/Qcur-0.add"), Some((Rule::Split(3), Some("Qcur".into()))));
    assert_eq!(rule("s0/Qcur-0.rope"), Some((Rule::Split(2), Some("Qcur.rope".into()))));
    assert_eq!(rule("s0/kq-0"), Some((Rule::Sum, None)));
}

#[test]
fn bad_specs_name_the_file_and_the_problem() {
    let cases = [
        ("[taps]\nkq = 4\n", "[taps] \"kq\": axis 4 is outside"),
        ("[taps]\nkq = -1\n", "axis -1 is outside"),
        ("[taps]\nkq = \"split\"\n", "\"split\" is not a rule"),
        ("[taps]\nkq = 1.5\n", "1.5 is not a rule"),
        ("[taps]\n\"kq-0\" = 1\n", "without step or layer"),
        ("[taps]\n\"s0/kq\" = 1\n", "without step or layer"),
        ("tolerence = 0.1\n", "unknown field `tolerence`"),
        ("tolerance = -1.0\n", "expected a finite number"),
        ("default = 7\n", "default: axis 7"),
        ("[taps\nkq = 1\n", "line 1"),
    ];
    for (text, want) in cases {
        let e = ShardSpec::parse(text, Path::new("specs/tp.toml")).expect_err(text).to_string();
        assert!(e.starts_with("specs/tp.toml: bad shard spec: ") && e.contains(want), "{text:?}: {e}");
    }
    let e = ShardSpec::load(Path::new("/nonexistent/tp.toml")).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/tp.toml") && e.contains("cannot read"), "{e}");
}

#[test]
fn ranks_with_different_tokens_or_bad_files_are_refused() {
    let (full, how) = synthetic();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.safetensors");
    let mut ranks = split(&full, &how, 2);
    ranks[1].tokens[2] = 1;
    let files = write_ranks(dir.path(), &ranks);
    let e = merge_files(&spec(SYNTH_SPEC), &files, &out).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(&e, MergeError::NotIdentical { key, rank: 1, .. } if key == "tokens"), "{msg}");
    assert!(msg.contains("first difference at element 2") && msg.contains("rank1.safetensors"), "{msg}");

    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    let e = merge_files(&spec(SYNTH_SPEC), &[files[0].clone(), junk.clone()], &out).unwrap_err().to_string();
    assert!(e.contains("junk.safetensors: not a valid safetensors file"), "{e}");
    let e = merge_files(&spec(SYNTH_SPEC), &[files[0].clone(), dir.path().join("absent.safetensors")], &out).unwrap_err().to_string();
    assert!(e.contains("absent.safetensors: cannot read"), "{e}");
    assert!(matches!(merge_files(&spec(SYNTH_SPEC), &[], &out), Err(MergeError::NoRanks)));
}

#[test]
fn half_precision_rank_files_are_merged_exactly() {
    // two ranks holding an f16 and a bf16 slice of a [1, 2, 1, 2] tap split on axis 1, and an f64 replicated one
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, tensors: Vec<(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)>| {
        let views: Vec<_> = tensors.iter().map(|(k, d, s, b)| (k.to_string(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap())).collect();
        let p = dir.path().join(name);
        safetensors::serialize_to_file(views, None, &p).unwrap();
        p
    };
    let f16 = |v: &[f32]| v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect::<Vec<u8>>();
    let bf16 = |v: &[f32]| v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect::<Vec<u8>>();
    let f64b = |v: &[f64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    use safetensors::Dtype::{BF16, F16, F64};
    let r0 = write("r0.safetensors", vec![("s0/kq-0", F16, vec![1, 1, 1, 2], f16(&[0.5, -2.0])), ("s0/embd", F64, vec![3], f64b(&[0.25, 1.0, -8.0]))]);
    let r1 = write("r1.safetensors", vec![("s0/kq-0", BF16, vec![1, 1, 1, 2], bf16(&[3.0, 0.125])), ("s0/embd", F64, vec![3], f64b(&[0.25, 1.0, -8.0]))]);
    let out = dir.path().join("m.safetensors");
    merge_files(&spec("[taps]\nkq = 1\nembd = \"replicated\"\n"), &[r0, r1], &out).unwrap();
    let d = Dump::read(&out);
    assert_eq!(d.taps["s0/kq-0"], ([1, 2, 1, 2], vec![0.5, -2.0, 3.0, 0.125]));
    assert_eq!(d.taps["s0/embd"], ([1, 1, 1, 3], vec![0.25, 1.0, -8.0]), "a 1-D tap is left-padded to 4-D");
}

#[test]
fn the_cli_merges_and_reports_errors() {
    let (full, how) = synthetic();
    let dir = tempfile::tempdir().unwrap();
    let files = write_ranks(dir.path(), &split(&full, &how, 2));
    let spec_path = dir.path().join("tp.toml");
    std::fs::write(&spec_path, format!("{SYNTH_SPEC}\"unused.family\" = 1\n")).unwrap();
    let out = dir.path().join("merged.safetensors");
    let run = |ranks: &[PathBuf]| {
        Command::new(env!("CARGO_BIN_EXE_lockstep")).arg("merge-shards").arg("--spec").arg(&spec_path).arg("--out").arg(&out).args(ranks).output().unwrap()
    };
    let o = run(&files);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("2 ranks merged: 62 taps split, 24 replicated (max difference between ranks 0.000e0), 8 summed, 1 other tensors"), "{stdout}");
    assert!(stdout.contains("note: spec patterns that matched no tap: unused.family"), "{stdout}");
    assert_eq!(Dump::read(&out), full);

    let o = run(&[files[0].clone(), dir.path().join("rank9.safetensors")]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("rank9.safetensors: cannot read"), "{stderr}");
}
