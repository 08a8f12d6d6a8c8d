"""ci/regenerate-golden: writes everything under golden/ from llama.cpp. See golden/README.md.

Everything is written to a temporary directory first and moved into golden/ only when complete;
`--check` regenerates into a temporary directory and reports every difference from golden/.
Deterministic: fixed thread count, no sampling (greedy), sorted JSON, safetensors' sorted header.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import capture
import export
import models
import prompts
import tiny
from export import CONTINUATION, THREADS, TIERS, log

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "golden"
GENERATED = ["manifest.json", "models", "taps", "tokenize", "dequant"]   # README.md is hand-written
TAPPED_DECODE_STEPS = 4


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


def generate(out: Path, only: set[str] | None) -> None:
    prov = export.library_provenance()
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

    jobs = [(m, tier, p) for m in model_files for tier in TIERS for p in prompts.PROMPTS[m]
            if p["id"] not in export.LONG_PROMPTS or tier in export.LONG_TIERS]
    done = 0
    for m, path in model_files.items():
        sha = models.sha256_file(path)
        n_layer = export.n_layer_of(path)
        for tier in TIERS:
            run_path = export.exact_copy(path, sha, log) if tier == "exact" else path
            llm = capture.LlamaCpp(str(run_path), tier, THREADS)
            try:
                for prompt in prompts.PROMPTS[m]:
                    done += 1
                    select = None
                    if prompt["id"] in export.LONG_PROMPTS:   # rows only, exact tier only (export.py)
                        if tier not in export.LONG_TIERS:
                            continue
                        keep, select, dtype, full, kept = export.long_policy(n_layer, tier)
                    else:
                        keep, dtype, full, kept = keep_policy(m, n_layer, tier, prompt["id"])
                    t0 = time.time()
                    text = prompts.render(path, prompt)
                    tokens = llm.tokenize(text, add_special=True, parse_special=True)
                    llm.n_ctx = export.context_for(len(tokens), CONTINUATION)
                    rel = f"taps/{m}/{tier}/{prompt['id']}.safetensors"
                    model_file = str(path.relative_to(out)) if path.is_relative_to(out) else f"{m}.gguf (cache)"
                    rec = export.export_taps(
                        llm, out, rel, model_id=m, model_sha256=sha, model_file=model_file, tier=tier,
                        prompt=prompt, rendered=text, tokens=tokens, n_layer=n_layer, keep=keep, dtype=dtype,
                        full_layers=full, kept=kept, tapped_steps=TAPPED_DECODE_STEPS, n_continue=CONTINUATION,
                        select=select)
                    files.append(rec)
                    size = (out / rel).stat().st_size
                    log(f"[{done}/{len(jobs)}] {m} {tier} {prompt['id']}: {len(tokens)} tokens, "
                        f"{len(rec['tensors'])} tensors, {size / 1e6:.1f} MB, {time.time() - t0:.1f} s")
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

    export.finish_records(files, out, "ci/regenerate-golden")
    files.sort(key=lambda f: f["path"])
    manifest = {"schema": 1, "generator": "ci/regenerate-golden", "command": "ci/regenerate-golden",
                "provenance": prov, "models": {m: {"sha256": models.REAL[m]["sha256"],
                                                  "packages": models.REAL[m]["packages"]} for m in real},
                "tiers": export.TIER_DESCRIPTIONS,
                "files": files}
    import noise
    log("noise: llama.cpp's distance from an f64 evaluation, per tap (ci/golden/noise.py)")
    noise.annotate(manifest, out, log=log)
    export.write_manifest(manifest, out)
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


def manifest_differences(a: Path, b: Path, only: set[str]) -> list[str]:
    """manifest.json of `a` against `b`, restricted to the files of the models in `only` (their
    records, with every tensor's sha256 and noise) and the top-level fields other than the file list."""
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    diffs = [f"manifest.json: top-level {k!r} differs" for k in sorted(set(ma) | set(mb))
             if k != "files" and ma.get(k) != mb.get(k)]
    ra = {f["path"]: f for f in ma["files"] if f.get("model") in only}
    rb = {f["path"]: f for f in mb["files"] if f.get("model") in only}
    for path in sorted(set(ra) | set(rb)):
        if path not in ra or path not in rb:
            diffs.append(f"manifest.json: record {path} only in {'regenerated' if path in ra else 'golden/'}")
        elif ra[path] != rb[path]:
            fields = sorted(k for k in set(ra[path]) | set(rb[path]) if ra[path].get(k) != rb[path].get(k))
            diffs.append(f"manifest.json: record {path} differs in {', '.join(fields)}")
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
                # The regenerated manifest lists only those models' files: compare their records (noise
                # included) and the top-level fields, not the whole file.
                diffs = [d for d in diffs if any(m in d for m in only)] + manifest_differences(out, GOLDEN, only)
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
