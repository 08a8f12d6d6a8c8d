//! `lockstep compare` on perturbed copies of a golden names exactly the step, layer and tap that was
//! perturbed, down to the smallest perturbations: one element, one row, one head, one decode step.

use lockstep::compare::compare_dump;
use lockstep::golden::Manifest;
use lockstep::synth;

struct Perturbation {
    what: &'static str,
    key: &'static str,
    edit: fn(&[usize], &mut Vec<f32>),
}

const CASES: &[Perturbation] = &[
    Perturbation { what: "one element", key: "s0/ffn_up-0", edit: |_, d| d[5] += 0.5 },
    Perturbation {
        what: "one row",
        key: "s0/attn_norm-1",
        edit: |s, d| {
            let w = s[3];
            d[w..2 * w].iter_mut().for_each(|v| *v *= 1.01)
        },
    },
    Perturbation {
        what: "one head",
        key: "s0/Qcur-1.rope",
        // [1, tokens, heads, head_dim]: head 1 of every token, scaled by 1.001.
        edit: |s, d| {
            let (t, h, hd) = (s[1], s[2], s[3]);
            for tok in 0..t {
                d[(tok * h + 1) * hd..(tok * h + 2) * hd].iter_mut().for_each(|v| *v *= 1.001)
            }
        },
    },
    Perturbation { what: "one decode step", key: "s2/kqv-0", edit: |_, d| d.iter_mut().for_each(|v| *v += 1e-3) },
];

#[test]
fn compare_names_the_perturbed_tap() {
    let dir = tempfile::tempdir().unwrap();
    let golden = synth::write_golden(dir.path()).unwrap();
    let manifest = Manifest::load(dir.path()).unwrap();

    // The unperturbed copy passes every check.
    let same = dir.path().join("same.safetensors");
    synth::rewrite(&golden, &same, |_, _, _| {}).unwrap();
    let case = compare_dump(&manifest, &same, "synthetic/exact/fox", None).unwrap();
    let failed: Vec<_> = case.failed_checks().collect();
    assert!(case.passed && case.first_divergence.is_none(), "{failed:#?}");

    for p in CASES {
        let dump = dir.path().join(format!("{}.safetensors", p.what.replace(' ', "_")));
        synth::rewrite(&golden, &dump, |k, s, d| {
            if k == p.key {
                (p.edit)(s, d)
            }
        })
        .unwrap();
        let case = compare_dump(&manifest, &dump, "synthetic/exact/fox", None).unwrap();
        assert!(!case.passed, "{}: perturbation not detected", p.what);
        let d = case.first_divergence.as_ref().unwrap_or_else(|| panic!("{}: no divergence", p.what));
        let want = lockstep::tapname::TapId::parse_key(p.key).unwrap();
        assert_eq!((d.step, d.layer, d.tap.as_str()), (want.step, want.layer, want.tap.as_str()), "{}", p.what);
        assert!(d.value > d.limit);
    }
}

/// A tap the engine did not dump is never the first divergence: a partial dump passes on what it holds,
/// and a failure after an undumped tap names the gap instead of a class.
#[test]
fn a_tap_not_dumped_is_never_the_first_divergence() {
    let dir = tempfile::tempdir().unwrap();
    let golden = synth::write_golden(dir.path()).unwrap();
    let manifest = Manifest::load(dir.path()).unwrap();
    let src = lockstep::golden::TapsFile::open(&golden).unwrap();
    let write = |perturb: Option<&str>| {
        let mut f32s = Vec::new();
        for k in src.keys().into_iter().filter(|k| k.starts_with('s') && k != "s0/kq-1") {
            let mut t = src.f32(&k).unwrap();
            if Some(k.as_str()) == perturb {
                t.data.iter_mut().for_each(|v| *v *= 1.5);
            }
            f32s.push((k, t.shape, t.data));
        }
        let dump = dir.path().join("partial.safetensors");
        lockstep::golden::write_safetensors(&dump, &f32s, &[]).unwrap();
        compare_dump(&manifest, &dump, "synthetic/exact/fox", None).unwrap()
    };
    let clean = write(None);
    assert!(clean.passed, "{:?}", clean.failed_checks().collect::<Vec<_>>());
    assert!(clean.first_divergence.is_none());

    let bad = write(Some("s0/kq_soft_max-1"));
    assert!(!bad.passed);
    let d = bad.first_divergence.clone().unwrap();
    assert_eq!((d.step, d.layer, d.tap.as_str()), (0, Some(1), "kq_soft_max-1"));
    assert_eq!(bad.likely_class_id, None, "no class without the taps in between: {:?}", bad.evidence);
    let ev = bad.evidence.unwrap();
    assert!(ev.contains("s0/kq-1") && ev.contains("did not dump"), "{ev}");
}

/// A dump whose tap has the golden's elements in another shape is refused before judging, naming the
/// tap and both shapes.
#[test]
fn a_dump_of_the_wrong_shape_gets_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let golden = synth::write_golden(dir.path()).unwrap();
    let manifest = Manifest::load(dir.path()).unwrap();
    let src = lockstep::golden::TapsFile::open(&golden).unwrap();
    let mut f32s = Vec::new();
    for k in src.keys().into_iter().filter(|k| k.starts_with('s')) {
        let t = src.f32(&k).unwrap();
        // embd transposed: [1, 1, width, tokens].
        let shape = if k == "s0/embd" { vec![1, 1, t.shape[3], t.shape[2]] } else { t.shape };
        f32s.push((k, shape, t.data));
    }
    let dump = dir.path().join("transposed.safetensors");
    lockstep::golden::write_safetensors(&dump, &f32s, &[]).unwrap();
    let e = compare_dump(&manifest, &dump, "synthetic/exact/fox", None).unwrap_err().to_string();
    assert!(e.contains("s0/embd") && e.contains("transposed.safetensors"), "{e}");
}

#[test]
fn an_unknown_entry_and_a_corrupt_golden_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let golden = synth::write_golden(dir.path()).unwrap();
    let manifest = Manifest::load(dir.path()).unwrap();
    let e = compare_dump(&manifest, &golden, "synthetic/exact/nope", None).unwrap_err().to_string();
    assert!(e.contains("synthetic/exact/fox"), "{e}");
    // Flip one byte of the golden's data: the checksum names the file and the fix.
    let mut bytes = std::fs::read(&golden).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&golden, bytes).unwrap();
    let e = compare_dump(&manifest, &golden, "synthetic/exact/fox", None).unwrap_err().to_string();
    assert!(e.contains("fox.safetensors") && e.contains("ci/regenerate-golden"), "{e}");
}

/// The likely class follows the pattern around the first divergence (docs/bug-classes.md).
#[test]
fn likely_classes_from_patterns() {
    let dir = tempfile::tempdir().unwrap();
    let golden = synth::write_golden(dir.path()).unwrap();
    let manifest = Manifest::load(dir.path()).unwrap();
    let cases: &[(&str, &str, fn(&[usize], &mut Vec<f32>))] = &[
        // RoPE wrong only at positions ≥ 1 (position 0 is unrotated by any RoPE).
        ("s0/Qcur-0.rope", "RoPE pairing or base", |s, d| {
            let n = s[2] * s[3];
            d[n..].iter_mut().for_each(|v| *v = -*v)
        }),
        // The bias: mul_mat passes, add fails.
        ("s0/Qcur-0.add", "Q/K/V bias (zeroed or not loaded)", |_, d| d.iter_mut().for_each(|v| *v += 3.0)),
        // Decode step 1's scores wrong, prefill fine.
        ("s1/kq-0", "KV cache (never written, wrong layout or stride)", |_, d| d.iter_mut().for_each(|v| *v *= 0.5)),
        // Every row but the last of the prefill's attention differs.
        ("s0/kq_soft_max-0", "causal mask missing", |s, d| {
            let (h, t, kv) = (s[1], s[2], s[3]);
            for hh in 0..h {
                for r in 0..t - 1 {
                    d[(hh * t + r) * kv..(hh * t + r + 1) * kv].iter_mut().for_each(|v| *v = 1.0 / kv as f32)
                }
            }
        }),
        ("s0/embd", "embedding lookup (index transposed or wrong row)", |_, d| d.reverse()),
    ];
    for (key, class, edit) in cases {
        let dump = dir.path().join("d.safetensors");
        synth::rewrite(&golden, &dump, |k, s, d| {
            if k == *key {
                edit(s, d)
            }
        })
        .unwrap();
        let case = compare_dump(&manifest, &dump, "synthetic/exact/fox", None).unwrap();
        assert_eq!(case.likely_class.as_deref(), Some(*class), "{key}: {:?}", case.evidence);
    }
}
