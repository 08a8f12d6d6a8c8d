"""The transformers adapter end to end: HF on the tiny GGUFs vs llama.cpp's exact goldens, judged by
`lockstep compare`, plus a planted bug (qwen2's layer-0 Q bias dropped) that must be localized.

Needs torch + transformers + accelerate + gguf (pip install './python[hf]') and the lockstep binary
(LOCKSTEP_BIN or target/release/lockstep). Without them the tests skip with the reason;
LOCKSTEP_REQUIRE_HF=1 turns those skips into failures.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import GOLDEN, REPO, golden_taps, require_or_skip
from lockstep_kit import Recorder
from lockstep_kit.diff import compare, logits_report

# The exact tier's tiny goldens were made from the quantized file's weights dequantized to F32
# (manifest: model_file models/{m}.q.gguf); transformers dequantizes the same file the same way.
MODELS = ["tiny-qwen2", "tiny-llama"]
# Measured 2026-11-28 (transformers 5.24.0, torch 2.15.0, CPU): worst tap 1.7e-6 (qwen2), 1.1e-6 (llama).
MAX_REL_L2 = 1e-4


@pytest.fixture(scope="module")
def hf():
    for mod in ("torch", "transformers", "accelerate", "gguf"):
        try:
            __import__(mod)
        except ImportError:
            require_or_skip(f"{mod} is not installed (pip install './python[hf]'): HF adapter not tested")


def lockstep_bin():
    b = os.environ.get("LOCKSTEP_BIN") or str(REPO / "target" / "release" / "lockstep")
    if not os.path.isfile(b):
        require_or_skip(f"{b} not built (cargo build --release, or set LOCKSTEP_BIN): no lockstep compare")
    return b


def run_adapter(model, entry, out):
    cmd = [sys.executable, "-m", "lockstep_kit.hf", "--gguf", str(GOLDEN / "models" / f"{model}.q.gguf"),
           "--golden", str(golden_taps(entry)), "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO / "python")
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout}\n{p.stderr}"
    return p.stdout


def lockstep_compare(dump, entry, report_dir):
    cmd = [lockstep_bin(), "compare", "--dump", str(dump), "--golden", entry, "--report", str(report_dir)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    path = report_dir / "report.json"
    assert path.is_file(), f"{' '.join(cmd)} wrote no report.json (exit {p.returncode})\n{p.stdout}\n{p.stderr}"
    return p, json.loads(path.read_text())["cases"][0]


@pytest.mark.parametrize("model", MODELS)
def test_hf_matches_llamacpp_exact_tier(hf, model, tmp_path):
    from safetensors.numpy import load_file

    entry = f"{model}/exact/fox"
    dump = tmp_path / "hf.safetensors"
    stdout = run_adapter(model, entry, dump)
    assert "golden keys not dumped: 0" in stdout, stdout
    d, g = load_file(str(dump)), load_file(str(golden_taps(entry)))
    assert Recorder(golden_taps(entry)).golden_tokens().tolist() == d["tokens"].tolist()
    rows = compare(d, g)
    assert len(rows) == len([k for k in g if k.startswith("s")]), "a golden key was not compared"
    worst = max(rows, key=lambda r: r[1])
    assert worst[1] < MAX_REL_L2, f"worst tap {worst}"
    for step, kl, _top, _lse, argmax, nxt in logits_report(d, g):
        assert argmax == nxt, f"step {step}: HF's argmax {argmax}, llama.cpp's {nxt}"
        assert kl is not None and kl < 1e-8, f"step {step}: KL {kl}"

    p, case = lockstep_compare(dump, entry, tmp_path / "report")
    assert case["error"] is None, case["error"]
    assert case["first_divergence"] is None and case["passed"], (
        f"lockstep compare: {case['first_divergence']} {case['likely_class_id']}\n{p.stdout}"
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_planted_dropped_bias_is_localized(hf, tmp_path):
    import torch

    from lockstep_kit import hf as adapter

    entry = "tiny-qwen2/exact/fox"
    model = adapter.load_model(gguf=str(GOLDEN / "models" / "tiny-qwen2.q.gguf"))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.zero_()  # the bug: Q bias dropped in layer 0
    rec = Recorder(golden=golden_taps(entry))
    adapter.run(model, rec, log=lambda *_: None)
    dump = tmp_path / "bias.safetensors"
    rec.save(dump)
    p, case = lockstep_compare(dump, entry, tmp_path / "report")
    assert not case["passed"] and p.returncode != 0
    fd = case["first_divergence"]
    assert (fd["step"], fd["layer"]) == (0, 0) and fd["tap"].startswith("Qcur-0"), fd
    assert case["likely_class_id"] == "qkv_bias", (case["likely_class_id"], case["evidence"])


def test_model_dir_checkpoint(hf, tmp_path):
    """--model-dir: a transformers checkpoint (here: tiny-llama's GGUF weights saved by transformers)."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(GOLDEN / "models"), gguf_file="tiny-llama.q.gguf", dtype=torch.float32)
    cfg = m.config
    if hasattr(cfg, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained: copy it
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(m.state_dict())
    plain.save_pretrained(str(tmp_path / "ckpt"))

    entry = "tiny-llama/exact/fox"
    dump = tmp_path / "hf.safetensors"
    cmd = [sys.executable, "-m", "lockstep_kit.hf", "--model-dir", str(tmp_path / "ckpt"),
           "--golden", str(golden_taps(entry)), "--out", str(dump), "--generate", "0"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO / "python")
    assert p.returncode == 0 and "golden keys not dumped: 0" in p.stdout, p.stdout + p.stderr
    rows = compare(load_file(str(dump)), load_file(str(golden_taps(entry))))
    assert max(r[1] for r in rows) < MAX_REL_L2
    assert "continuation" not in load_file(str(dump))  # --generate 0

    bad = subprocess.run(cmd[:4] + [str(tmp_path / "absent")] + cmd[5:], capture_output=True, text=True,
                         cwd=REPO / "python")
    assert bad.returncode == 2 and "not a transformers checkpoint directory" in bad.stderr
