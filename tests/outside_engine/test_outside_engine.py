"""The outside engine (numpy_engine.py) judged only through `lockstep compare`.

    ~/.cache/lockstep/kit-venv/bin/python -m pytest tests/outside_engine -q

- clean, f32 (plain BLAS order) and f64: every exact golden passes;
- each planted bug: the first divergence is at the expected step, layer and tap, with the expected class id.
- a long golden's row-subset taps dumped whole: lockstep cuts them to the kept rows (clean passes, the
  80-position window is still found at position 80);
- gemma3-270m (no committed golden): its exact on-demand golden from `lockstep golden` carries noise for
  every tap (this engine in f64); llama.cpp's own taps fed back as a dump and this engine (f32, f64) pass
  every check, and SiLU in place of its GELU gate is found at s0 ffn_geglu-0, class activation (needs the
  golden venv).
Tiny models always run (their exact goldens come from golden/models/tiny-*.q.gguf dequantized to F32:
manifest `model_file`); the real models run when `lockstep fetch` has put them into the cache, and are
skipped with the reason otherwise. The lockstep binary: $LOCKSTEP_BIN or target/release/lockstep.
The first run on a real model dequantizes it with gguf-py and caches the result (~/.cache/lockstep/
outside-engine/), which takes minutes; later runs load the cache.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads: see numpy_engine.py

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import numpy_engine  # noqa: E402

REPO = HERE.parents[1]
CACHE = Path(os.environ.get("LOCKSTEP_CACHE", Path.home() / ".cache" / "lockstep"))
LOCKSTEP = Path(os.environ.get("LOCKSTEP_BIN", REPO / "target/release/lockstep"))

TINY = {
    "tiny-qwen2": REPO / "golden/models/tiny-qwen2.q.gguf",
    "tiny-llama": REPO / "golden/models/tiny-llama.q.gguf",
}
REAL = {
    "qwen2.5-coder-0.5b": CACHE / "models/qwen2.5-coder-0.5b.gguf",
    "smollm2-135m": CACHE / "models/smollm2-135m.gguf",
}
MODELS = {**TINY, **REAL}
# gemma3 has no committed golden: its on-demand golden (`lockstep golden`) is judged (test_gemma3_*).
GEMMA3 = CACHE / "models/gemma3-270m.gguf"
GEMMA3_PROMPT = "The capital of France is"


def exact_entries(model: str) -> list[str]:
    return [f"{model}/exact/{p.stem}" for p in sorted((REPO / "golden/taps" / model / "exact").glob("*.safetensors"))]


CLEAN_CASES = [(e, dt) for m in MODELS for e in exact_entries(m) for dt in ("f32", "f64")]
# Planted bugs: every bug on one prompt per model (fox for the tiny models, code for the real ones, whose
# `code` golden keeps every tap of layers 0, 1, middle and last).
BUG_ENTRIES = {
    "tiny-qwen2": "tiny-qwen2/exact/fox",
    "tiny-llama": "tiny-llama/exact/fox",
    "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b/exact/code",
    "smollm2-135m": "smollm2-135m/exact/code",
}
ARCH = {"tiny-qwen2": "qwen2", "tiny-llama": "llama", "qwen2.5-coder-0.5b": "qwen2", "smollm2-135m": "llama",
        "gemma3-270m": "gemma3"}
BUG_CASES = [
    (f"{m}/exact/{spec.prompt}" if spec.prompt else BUG_ENTRIES[m], b)
    for m in MODELS
    for b, spec in numpy_engine.BUGS.items()
    if ARCH[m] in spec.archs and (spec.models is None or m in spec.models)
]

_loaded: dict[str, numpy_engine.Model] = {}


def model_for(entry: str) -> numpy_engine.Model:
    """The entry's model, loaded once (the last one only: real models are large)."""
    name = entry.split("/")[0]
    path = {**MODELS, "gemma3-270m": GEMMA3}[name]
    if not path.is_file():
        pytest.skip(f"{name}: {path} missing (run `lockstep fetch {name}` to test this real model)")
    if name not in _loaded:
        _loaded.clear()
        _loaded[name] = numpy_engine.Model(path)
    m = _loaded[name]
    assert m.cfg.arch == ARCH[name], f"{path}: architecture {m.cfg.arch}, expected {ARCH[name]}"
    return m


def lockstep_bin() -> Path:
    if not LOCKSTEP.is_file():
        pytest.fail(f"lockstep binary {LOCKSTEP} missing: `cargo build --release` or set LOCKSTEP_BIN")
    return LOCKSTEP


def judge(entry: str, dtype: str, bug: str | None, tmp_path: Path, whole_rows: bool = False) -> dict:
    """Runs the outside engine on `entry`'s golden, dumps, runs `lockstep compare`; returns cases[0]."""
    m = model_for(entry)
    golden = REPO / "golden/taps" / f"{entry}.safetensors"
    taps = numpy_engine.run(m.path, golden, dtype=dtype, bug=bug, model=m, whole_rows=whole_rows)
    dump = tmp_path / "dump.safetensors"
    numpy_engine.save_dump(taps, dump)
    return compare(dump, entry, tmp_path)


def compare(dump: Path, entry: str, tmp_path: Path) -> dict:
    """`lockstep compare --dump DUMP --golden ENTRY`; returns report.json's cases[0]."""
    report = tmp_path / "report"
    proc = subprocess.run(
        [str(lockstep_bin()), "compare", "--dump", str(dump), "--golden", entry, "--report", str(report)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    rj = report / "report.json"
    assert rj.is_file(), f"lockstep compare wrote no {rj} (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    case = json.loads(rj.read_text())["cases"][0]
    case["_stdout"] = proc.stdout + proc.stderr
    case["_exit"] = proc.returncode
    return case


def summary(case: dict) -> str:
    fd = case.get("first_divergence")
    failed = [f"{c['name']}:{c.get('metric')}={c.get('value')} (limit {c.get('limit')})"
              for c in case.get("checks", []) if not c.get("passed")]
    return (f"passed={case.get('passed')} error={case.get('error')} first_divergence={fd} "
            f"likely_class_id={case.get('likely_class_id')} likely_class={case.get('likely_class')}\n"
            f"failed checks: {failed[:8]}\n--- lockstep output ---\n{case['_stdout'][-3000:]}")


@pytest.mark.parametrize("entry,dtype", CLEAN_CASES, ids=[f"{e}-{d}" for e, d in CLEAN_CASES])
def test_clean_engine_passes_exact_tier(entry, dtype, tmp_path):
    case = judge(entry, dtype, None, tmp_path)
    assert case["error"] is None, summary(case)
    assert case["passed"] is True, summary(case)
    assert case["first_divergence"] is None, summary(case)
    assert case["_exit"] == 0, summary(case)


LONG_CASES = [(f"{m}/exact/long", b) for m in REAL for b in (None, "attention_window_80")]


@pytest.mark.parametrize("entry,bug", LONG_CASES, ids=[f"{e}-{b or 'clean'}" for e, b in LONG_CASES])
def test_whole_taps_of_a_long_golden_are_cut_by_lockstep(entry, bug, tmp_path):
    """A long golden keeps some token rows of its prefill taps (golden/README.md, "Row-subset taps"); an
    engine that dumps those taps whole (every one of the ~1,100 rows, kq-0 [1, H, T, T]) is judged on the
    kept rows: clean passes, and the 80-position window is still found at position 80 of kq_soft_max-0."""
    case = judge(entry, "f32", bug, tmp_path, whole_rows=True)
    notes = "\n".join((case.get("coverage") or {}).get("notes") or [])
    assert case["error"] is None, summary(case)
    assert "row-subset taps dumped whole" in notes and "rows kept: 79, 80, 511, 512" in notes, notes
    if bug is None:
        assert case["passed"] is True and case["first_divergence"] is None, summary(case)
    else:
        fd = case["first_divergence"] or {}
        want = numpy_engine.BUGS[bug]
        got = (fd.get("step"), fd.get("layer"), fd.get("tap"), case.get("likely_class_id"))
        assert got == (want.step, want.layer, want.tap, want.class_id), summary(case)


@pytest.mark.parametrize("entry,bug", BUG_CASES, ids=[f"{e}-{b}" for e, b in BUG_CASES])
def test_planted_bug_is_localized(entry, bug, tmp_path):
    arch = ARCH[entry.split("/")[0]]
    want = numpy_engine.expected_localization(bug, arch)
    case = judge(entry, "f32", bug, tmp_path)
    assert case["passed"] is False, f"planted bug {bug} passed:\n" + summary(case)
    fd = case["first_divergence"]
    assert fd is not None, f"{bug}: no first divergence\n" + summary(case)
    got = (fd["step"], fd["layer"], fd["tap"], case.get("likely_class_id"))
    expected = (want.step, want.layer, want.tap, want.class_id)
    assert got == expected, f"{bug}: expected (step, layer, tap, class) {expected}, got {got}\n" + summary(case)
    # The class is proven by re-applying the bug to llama.cpp's own inputs (src/probe.rs), except for the
    # bugs that need the weights to reproduce (a transposed projection).
    proof = case.get("class_proof") or {}
    want_proof = "suspected" if bug in UNPROVABLE else "confirmed"
    assert proof.get("verdict", "suspected") == want_proof, f"{bug}: class proof {proof}\n" + summary(case)


# Bugs whose reproduction needs the model's weights, which lockstep's proofs do not read; and the attention
# window, until src/probe.rs re-applies a window to the golden's kq-0 rows (the long goldens hold them).
UNPROVABLE = {"weight_transposed", "attn_output_transposed", "q4k_min_sign_layer2", "attention_window_80"}


def test_every_bug_has_a_realistic_class():
    """At least 10 planted bugs, each naming one of CONTEXT.md's stable class ids."""
    ids = {"tokenizer", "embedding", "rope", "qkv_bias", "projection_weight", "attention_scores", "gqa_mapping",
           "kv_cache", "causal_mask", "softmax_scale", "attn_output_projection", "residual_attn", "rms_norm",
           "norm_weight", "ffn_size", "ffn_weight", "activation", "ffn_down", "residual_ffn", "lm_head",
           "overflow", "layer_data", "wrong_shape", "sampling", "attention_window", "dequantization",
           "decode_kernel"}
    assert len(numpy_engine.BUGS) >= 10
    for b in numpy_engine.BUGS.values():
        assert b.class_id in ids, b


# What a row is (one token), as src/checks/taps.rs `token_axis_is_per_token_for_gemma3_per_head_taps`
# says it: gemma3-270m's shapes at a 6-token prefill and a decode step.
TOKEN_AXIS_CASES = [
    ("s0/Qcur_normed-0", (1, 6, 4, 256), 1), ("s0/Kcur_normed-0", (1, 6, 1, 256), 1),
    ("s0/norm-0.rms_norm.1", (1, 6, 4, 256), 1), ("s0/norm-0.rms_norm.2", (1, 6, 1, 256), 1),
    ("s0/Qcur-0.rope", (1, 6, 4, 256), 1), ("s0/norm-0.rms_norm.0", (1, 1, 6, 640), 2),
    ("s0/Qcur-0.mul_mat", (1, 1, 6, 1024), 2), ("s0/kq_soft_max-0", (1, 4, 6, 6), 2),
    ("s0/kqv-0", (1, 4, 6, 256), 2), ("s0/norm.rms_norm.14", (1, 1, 6, 640), 2),
    ("s1/Qcur_normed-0", (1, 1, 4, 256), 1), ("s1/norm-0.rms_norm.1", (1, 1, 4, 256), 1),
    ("s1/Qcur-0.rope", (1, 1, 4, 256), 1), ("s1/kq-0", (1, 4, 1, 7), 2), ("s1/l_out-0", (1, 1, 1, 640), 2),
    ("s0/Qcur_normed-0", (1, 1, 4, 256), 1),
]


def test_token_axis_agrees_with_the_runner():
    """The noise records' row_max (ci/golden/noise.py) and this engine's row cuts take the rows the runner
    judges: per token, also for gemma3's per-head Q/K norms [1, T, heads, head_dim]."""
    sys.path.insert(0, str(REPO / "ci" / "golden"))
    import noise
    for key, shape, axis in TOKEN_AXIS_CASES:
        assert noise.token_axis(key, shape) == axis == numpy_engine.token_axis(key, shape), (key, shape)
    # noise.py's row_max of a per-head tap is per token: one bad head of token 2 is token 2's row.
    import numpy as np
    g = np.arange(1.0, 1 + 3 * 2 * 2).reshape(1, 3, 2, 2)
    r = g.copy()
    r[0, 2, 1, 0] += 1.0
    rec = noise.tap_noise("s0/norm-0.rms_norm.1", g, r)
    assert rec["row_max"] == float(f"{1.0 / np.linalg.norm(g[0, 2]):.3e}"), rec


def test_unknown_bug_and_bad_files_are_clear_errors(tmp_path):
    golden = REPO / "golden/taps/tiny-qwen2/exact/fox.safetensors"
    with pytest.raises(numpy_engine.EngineError, match="unknown bug"):
        numpy_engine.run(TINY["tiny-qwen2"], golden, bug="no_such_bug")
    with pytest.raises(numpy_engine.EngineError, match="does not apply"):
        numpy_engine.run(TINY["tiny-llama"], REPO / "golden/taps/tiny-llama/exact/fox.safetensors",
                         bug="qkv_bias_dropped")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(numpy_engine.EngineError, match="bad.gguf"):
        numpy_engine.Model(bad)
    with pytest.raises(numpy_engine.EngineError, match="does not exist"):
        numpy_engine.read_golden(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("entry", exact_entries("qwen2.5-coder-0.5b"))
def test_a_deep_dequantization_slip_is_blamed_on_its_layer(entry, tmp_path):
    """Layer 2's Q4_K ffn_down dequantized with the wrong sign of min. Where the golden keeps layer 2's
    l_out, lockstep must name layer 2 (the layer, not a formula: the golden holds none of its FFN taps);
    where it keeps no tap of layer 2 (multiturn), it must name no class and say which taps are missing."""
    case = judge(entry, "f32", "q4k_min_sign_layer2", tmp_path)
    fd = case["first_divergence"]
    assert fd is not None and case["passed"] is False, summary(case)
    golden = REPO / "golden/taps" / f"{entry}.safetensors"
    if "s0/l_out-2" in numpy_engine.read_golden(golden).shapes:
        assert (fd["step"], fd["layer"], fd["tap"]) == (0, 2, "l_out-2"), summary(case)
        assert case.get("likely_class_id") == "layer_data", summary(case)
    else:
        assert case.get("likely_class_id") is None, summary(case)
        assert "holds none of its inputs" in (case.get("evidence") or ""), summary(case)


def gemma3_entry() -> Path:
    """gemma3-270m's exact on-demand golden of GEMMA3_PROMPT (`lockstep golden`: a cache hit once made,
    else an export of ~2 minutes in the golden venv, with llama.cpp's noise from this engine in f64; the
    model is fetched by the exporter when missing)."""
    venv = Path(os.environ.get("LOCKSTEP_GOLDEN_VENV") or CACHE / "venv")
    if not (venv / "bin" / "python").is_file():
        pytest.skip(f"the golden venv {venv} is not built (ci/golden/venv.sh): no on-demand gemma3 golden")
    proc = subprocess.run([str(lockstep_bin()), "golden", "--model", "gemma3-270m", "--prompt", GEMMA3_PROMPT,
                           "--tier", "exact"], cwd=REPO, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    keys = re.findall(r"cache:([0-9a-f]{24})", out)
    assert proc.returncode == 0 and keys, f"lockstep golden failed (exit {proc.returncode}):\n{out[-3000:]}"
    return CACHE / "goldens" / keys[0]


def failed_checks(case: dict) -> set[str]:
    return {c["name"] for c in case.get("checks", []) if not c.get("passed")}


@pytest.fixture(scope="module")
def gemma3_golden_verdict(tmp_path_factory):
    """llama.cpp's own gemma3 taps judged as a dump (its tokens and every tap of every step)."""
    d = gemma3_entry()
    tmp = tmp_path_factory.mktemp("gemma3-golden")
    from safetensors.numpy import load_file, save_file
    g = load_file(str(d / "taps.safetensors"))
    save_file({k: v for k, v in g.items() if k.startswith("s") and "/" in k or k == "tokens"}, str(tmp / "g.safetensors"))
    return d, compare(tmp / "g.safetensors", f"cache:{d.name}", tmp)


def checks_named(case: dict, prefix: str) -> list[dict]:
    return [c for c in case.get("checks", []) if c["name"].startswith(prefix)]


def test_gemma3_golden_fed_back_passes_every_check(gemma3_golden_verdict):
    """lockstep knows gemma3's graph: llama.cpp's own taps pass every check, the invariants included (RoPE's
    input is Qcur_normed/Kcur_normed; an RMSNorm row whose input's mean square is below eps, as layer 14's
    FFN output for the BOS token, is held to ms/(ms + eps); rows of the per-head taps are tokens)."""
    d, case = gemma3_golden_verdict
    assert case["error"] is None and case["_exit"] == 0, summary(case)
    assert case["passed"] is True and case["first_divergence"] is None and not failed_checks(case), summary(case)
    inv = {c["name"]: c for c in checks_named(case, "invariants:")}
    assert {"invariants:rms_unit", "invariants:rope_pair_norm", "invariants:rope_relative"} <= set(inv), sorted(inv)
    assert "held to ms/(ms + eps)" in inv["invariants:rms_unit"]["detail"], inv["invariants:rms_unit"]
    assert inv["invariants:rope_pair_norm"]["value"] < 1e-6, inv["invariants:rope_pair_norm"]
    cov = case["coverage"]
    assert cov["compared"] == cov["golden_taps"] > 2000, cov


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_gemma3_on_demand_golden_is_reproduced_within_its_noise(dtype, gemma3_golden_verdict, tmp_path):
    """gemma3 (sliding-window attention, Q/K norms, GELU gate, embedding scale, post-norms) in this engine:
    the on-demand golden carries llama.cpp's noise for every tap (measured with this engine in f64), and the
    engine passes every check: every tap and the logits within the calibrated limits, and the invariants."""
    d, _ = gemma3_golden_verdict
    manifest = json.loads((d / "manifest.json").read_text())
    assert "noise_skipped" not in manifest, manifest.get("noise_skipped")
    rec = manifest["files"][0]
    taps = [t for t in rec["tensors"] if "/" in t["key"] and t["key"].startswith("s")]
    assert taps and all("noise" in t for t in taps), [t["key"] for t in taps if "noise" not in t][:5]
    assert Path(rec["model_file"]).resolve() == GEMMA3.resolve(), rec["model_file"]
    m = model_for("gemma3-270m/")
    dump = tmp_path / "dump.safetensors"
    numpy_engine.save_dump(numpy_engine.run(m.path, d / "taps.safetensors", dtype=dtype, model=m), dump)
    case = compare(dump, f"cache:{d.name}", tmp_path)
    assert case["error"] is None, summary(case)
    tap_checks = checks_named(case, "taps:") + checks_named(case, "logits:")
    assert len(tap_checks) > 20 and all(c["passed"] for c in tap_checks), summary(case)
    assert len(checks_named(case, "invariants:")) >= 6, summary(case)
    assert case["passed"] is True and case["first_divergence"] is None and not failed_checks(case), summary(case)
    assert case["_exit"] == 0, summary(case)


def test_gemma3_silu_for_gelu_is_localized_as_the_activation(gemma3_golden_verdict, tmp_path):
    """gemma3's gate is GELU (ffn_geglu): SiLU in its place is found at s0 ffn_geglu-0, class activation."""
    d, _ = gemma3_golden_verdict
    bug = "silu_instead_of_gelu"
    want = numpy_engine.expected_localization(bug, "gemma3")
    m = model_for("gemma3-270m/")
    dump = tmp_path / "dump.safetensors"
    numpy_engine.save_dump(numpy_engine.run(m.path, d / "taps.safetensors", dtype="f32", bug=bug, model=m), dump)
    case = compare(dump, f"cache:{d.name}", tmp_path)
    assert case["passed"] is False and case["_exit"] == 1, summary(case)
    fd = case["first_divergence"] or {}
    got = (fd.get("step"), fd.get("layer"), fd.get("tap"), case.get("likely_class_id"))
    assert got == (want.step, want.layer, want.tap, want.class_id) == (0, 0, "ffn_geglu-0", "activation"), summary(case)
