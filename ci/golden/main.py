"""ci/regenerate-golden: writes everything under golden/ from llama.cpp. See golden/README.md.

Everything is written to a temporary directory first and moved into golden/ only when complete;
`--check` regenerates into a temporary directory and reports every difference from golden/.
Deterministic: fixed thread count, no sampling (greedy), sorted JSON, safetensors' sorted header.
"""
from __future__ import annotations

import argparse
import ctypes
import filecmp
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import gguf
import llama_cpp as L
import safetensors

import capture
import models
import prompts
import tiny
from dequant import save_sorted
from ggufutil import write_f32_copy

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "golden"
GENERATED = ["manifest.json", "models", "taps", "tokenize", "dequant"]   # README.md is hand-written
TIERS = ["exact", "shipped"]
TAPPED_DECODE_STEPS = 4
CONTINUATION = 32
THREADS = 2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def spread(n_layer: int) -> list[int]:
    """0, 1, the middle layer and the last."""
    return sorted({0, 1, n_layer // 2, n_layer - 1})


# What a taps file keeps. golden/ travels with the repository to the GPU machine, where the whole tree
# plus the (compressed) test binaries must stay under 64 MiB, so golden/ stays near 55 MB. A real model
# cannot keep every tap of every layer (qwen: ~107 KB per prompt token per layer in f32): prefill taps are
# what costs, decode steps (one token) are cheap. Per real model, (layers with every tap, families kept
# for every other layer), by tier and prompt:
#   exact   "code" (4-6 tokens) .. layers 0, 1, middle, last; l_out and kq_soft_max
#   exact   "haiku" .............. layer 0; l_out and kq_soft_max
#   exact   "multiturn" .......... layer 0
#   shipped "code" ............... layers 0, 1, middle, last; l_out
#   shipped "haiku", "multiturn" . layer 0
# Shipped tier: stored f16 (its tolerance is ~1e-2; f16 storage adds < 1e-3). Exact tier: f32.
# result_output (0.6 MB for qwen) at the prefill only; every step's top-64 logits and log-sum-exp are
# kept (topk_ids, topk_values, lse). Tiny models: every tap of every layer at every step.
REAL_POLICY = {
    ("exact", "code"): ("spread", ("l_out", "kq_soft_max")),
    ("exact", "haiku"): ("first", ("l_out", "kq_soft_max")),
    ("exact", "multiturn"): ("first", ()),
    ("shipped", "code"): ("spread", ("l_out",)),
    ("shipped", "haiku"): ("first", ()),
    ("shipped", "multiturn"): ("first", ()),
}



def spread(n_layer: int) -> list[int]:
    """0, 1, the middle layer and the last."""
    return sorted({0, 1, n_layer // 2, n_layer - 1})


def keep_policy(model_id: str, n_layer: int, tier: str, prompt_id: str):
    """(predicate on (step, tap), storage dtype, layers with every tap, description)."""
    dtype = np.float32 if tier == "exact" else np.float16
    if model_id.startswith("tiny-"):
        return (lambda step, tap: True), dtype, list(range(n_layer)), \
            f"every tap of every layer; stored {np.dtype(dtype).name}"
    layers, families = REAL_POLICY[(tier, prompt_id)]
    full = spread(n_layer) if layers == "spread" else [0]

    def keep(step: int, tap: capture.Tap) -> bool:
        if tap.name == "result_output":
            return step == 0   # decode steps: the top-64 logits and log-sum-exp (topk_*, lse) stand in
        if tap.layer is None or tap.layer in full:
            return True
        return capture.split_layer(tap.name)[0] in families
    desc = (f"every tap of layers {full} and of the non-layer tensors (result_output at the prefill only); "
            + (f"{' and '.join(families)} of every layer; " if families else "")
            + f"stored {np.dtype(dtype).name}")
    return keep, dtype, full, desc


def n_layer_of(path: Path) -> int:
    r = gguf.GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    return int(r.fields[f"{arch}.block_count"].contents())


def library_provenance() -> dict:
    lib = ctypes.CDLL(L.__path__[0] + "/lib/libggml-base.so")
    lib.ggml_commit.restype = ctypes.c_char_p
    lib.ggml_version.restype = ctypes.c_char_p
    return {"llama_cpp_python": L.__version__, "ggml_commit": lib.ggml_commit().decode(),
            "ggml_version": lib.ggml_version().decode(), "gguf": gguf.__version__ if hasattr(gguf, "__version__")
            else _dist_version("gguf"), "safetensors": safetensors.__version__, "numpy": np.__version__,
            "threads": THREADS, "backend": "CPU"}


def _dist_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


def exact_copy(model_id: str, src: Path, sha: str) -> Path:
    """The exact tier's F32 copy of the dequantized weights, cached outside the repository."""
    dst = models.cache_dir() / "golden-work" / f"{model_id}.{sha[:16]}.f32.gguf"
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        log(f"{model_id}: writing the exact tier's F32 copy ({dst})")
        write_f32_copy(src, dst)
    return dst


def write_taps(out: Path, rel: str, run: capture.Run, keep, dtype, meta: dict) -> list[dict]:
    """One safetensors file: s{step}/{tap} (graph order recorded in the returned list), tokens,
    continuation, topk_ids, topk_values, lse."""
    tensors: dict[str, np.ndarray] = {}
    listed = []
    for step, taps in enumerate(run.steps):
        for tap in taps:
            if not keep(step, tap):
                continue
            key = f"s{step}/{tap.key}"
            arr = np.ascontiguousarray(tap.array, dtype=dtype)
            tensors[key] = arr
            listed.append({"key": key, "tap": tap.key, "name": tap.name, "op": tap.op,
                           "stage": "prefill" if step == 0 else "decode", "step": step, "layer": tap.layer,
                           "shape": list(arr.shape), "dtype": "F32" if dtype == np.float32 else "F16",
                           "sha256": sha256_bytes(arr.tobytes())})
    extra = {"tokens": np.array(run.tokens, dtype=np.int32),
             "continuation": np.array(run.continuation, dtype=np.int32),
             "topk_ids": run.topk_ids, "topk_values": run.topk_values, "lse": run.lse}
    for key, arr in extra.items():
        tensors[key] = arr
        listed.append({"key": key, "shape": list(arr.shape), "dtype": str(arr.dtype),
                       "sha256": sha256_bytes(arr.tobytes())})
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    save_sorted(tensors, path, {k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()})
    return listed


def generate(out: Path, only: set[str] | None) -> None:
    prov = library_provenance()
    real = {m: models.ensure(m, log) for m in models.REAL if only is None or m in only or
            any(t["source"] == m for k, t in tiny.TINY.items() if only is None or k in only)}
    files: list[dict] = []
    model_files: dict[str, Path] = {}   # the file each model id means (shipped tier)
    for m, p in real.items():
        model_files[m] = p
    for m in tiny.TINY:
        if only is not None and m not in only:
            continue
        log(f"{m}: generating (seed {tiny.TINY[m]['seed']})")
        f32, q = tiny.make(m, real, out / "models", THREADS)
        model_files[m] = q
        for p, role in ((f32, "f32 source of the quantized file"), (q, "the model (shipped tier)")):
            files.append({"path": str(p.relative_to(out)), "kind": "model", "model": m, "role": role,
                          "generator": "ci/golden/tiny.py", "seed": tiny.TINY[m]["seed"]})
    if only is not None:
        model_files = {k: v for k, v in model_files.items() if k in only}

    jobs = [(m, tier, p) for m in model_files for tier in TIERS for p in prompts.PROMPTS[m]]
    done = 0
    for m, path in model_files.items():
        sha = models.sha256_file(path)
        n_layer = n_layer_of(path)
        for tier in TIERS:
            run_path = exact_copy(m, path, sha) if tier == "exact" else path
            llm = capture.LlamaCpp(str(run_path), tier, THREADS)
            try:
                for prompt in prompts.PROMPTS[m]:
                    keep, dtype, full, kept = keep_policy(m, n_layer, tier, prompt["id"])
                    done += 1
                    t0 = time.time()
                    text = prompts.render(path, prompt)
                    tokens = llm.tokenize(text, add_special=True, parse_special=True)
                    run = llm.run(tokens, TAPPED_DECODE_STEPS, CONTINUATION)
                    rel = f"taps/{m}/{tier}/{prompt['id']}.safetensors"
                    meta = {"model": m, "model_sha256": sha, "tier": tier, "prompt_id": prompt["id"],
                            "chat": prompt["chat"]}
                    tensors = write_taps(out, rel, run, keep, dtype, meta)
                    size = (out / rel).stat().st_size
                    files.append({
                        "path": rel, "kind": "taps", "model": m, "model_sha256": sha,
                        "model_file": str(path.relative_to(out)) if path.is_relative_to(out) else f"{m}.gguf (cache)",
                        "tier": tier, "prompt_id": prompt["id"], "chat": prompt["chat"],
                        "prompt": prompt.get("messages") or prompt.get("text"), "rendered": text,
                        "tokens": tokens, "continuation": run.continuation, "first_eog": run.first_eog,
                        "steps": len(run.steps), "decode_steps": len(run.steps) - 1,
                        "continuation_steps": CONTINUATION, "n_layer": n_layer,
                        "full_layers": full,
                        "kept": kept, "kv_cache": "f32" if tier == "exact" else "f16", "flash_attn": False,
                        "weights": "F32 copy of the dequantized weights" if tier == "exact" else "as shipped",
                        "tensors": tensors})
                    log(f"[{done}/{len(jobs)}] {m} {tier} {prompt['id']}: {len(tokens)} tokens, "
                        f"{len(tensors)} tensors, {size / 1e6:.1f} MB, {time.time() - t0:.1f} s")
            finally:
                llm.close()

    real_present = {m: p for m, p in model_files.items() if m in models.REAL}
    try:
        import tokenization
        log("tokenization goldens")
        files += tokenization.export(real_present, out)
    except ImportError as e:
        raise SystemExit(f"ci/golden/tokenization.py missing: {e}")
    import dequant
    log("dequantization goldens")
    files += dequant.export(model_files, out)

    for f in files:
        p = out / f["path"]
        f["sha256"] = models.sha256_file(p)
        f["bytes"] = p.stat().st_size
        f.setdefault("command", "ci/regenerate-golden")
    files.sort(key=lambda f: f["path"])
    manifest = {"schema": 1, "generator": "ci/regenerate-golden", "command": "ci/regenerate-golden",
                "provenance": prov, "models": {m: {"sha256": models.REAL[m]["sha256"],
                                                  "packages": models.REAL[m]["packages"]} for m in real},
                "tiers": {"exact": "F32 copy of the dequantized weights, f32 KV cache, flash attention off, CPU",
                          "shipped": "file as shipped, default (f16) KV cache, flash attention off, CPU"},
                "files": files}
    import noise
    log("noise: llama.cpp's distance from an f64 evaluation, per tap (ci/golden/noise.py)")
    noise.annotate(manifest, out, log=log)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    total = sum(f["bytes"] for f in files)
    log(f"done: {len(files)} files, {total / 1e6:.1f} MB")


def differences(a: Path, b: Path) -> list[str]:
    diffs = []
    for name in GENERATED:
        pa, pb = a / name, b / name
        la = {p.relative_to(a) for p in pa.rglob("*") if p.is_file()} if pa.is_dir() else ({Path(name)} if pa.exists() else set())
        lb = {p.relative_to(b) for p in pb.rglob("*") if p.is_file()} if pb.is_dir() else ({Path(name)} if pb.exists() else set())
        for rel in sorted(la ^ lb):
            diffs.append(f"{rel}: only in {'regenerated' if rel in la else 'golden/'}")
        for rel in sorted(la & lb):
            if not filecmp.cmp(a / rel, b / rel, shallow=False):
                diffs.append(f"{rel}: differs")
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(prog="ci/regenerate-golden", description=__doc__)
    ap.add_argument("--check", action="store_true", help="regenerate into a temporary directory and "
                    "report any difference from golden/ (exit 1 if any)")
    ap.add_argument("--only", nargs="*", help="model ids to regenerate (default: all); with --check, "
                    "compares only those files")
    ap.add_argument("--out", help="write into this directory instead of golden/ (for trying things out)")
    args = ap.parse_args()
    only = set(args.only) if args.only else None
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        generate(out, only)
        return 0
    with tempfile.TemporaryDirectory(prefix="golden-", dir=REPO) as tmp:
        out = Path(tmp)
        generate(out, only)
        if args.check:
            diffs = differences(out, GOLDEN)
            if only is not None:
                diffs = [d for d in diffs if any(m in d for m in only) or d.startswith("manifest.json")]
            for d in diffs:
                print(d)
            print("check: clean" if not diffs else f"check: {len(diffs)} difference(s)")
            return 1 if diffs else 0
        if only is not None:
            raise SystemExit("--only needs --check or --out: a run that replaces golden/ regenerates everything")
        for name in GENERATED:
            dst = GOLDEN / name
            if dst.is_dir():
                shutil.rmtree(dst)
            elif dst.exists():
                dst.unlink()
            shutil.move(str(out / name), str(dst))
        log(f"golden/ updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
