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
GENERATED = ["manifest.json", "models", "taps", "tokenize", "dequant", "anticheat"]   # README.md is hand-written
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
    import anticheat
    log("anti-cheat references: llama.cpp's continuation of check 9's 60 prompts (ci/golden/anticheat.py)")
    files += anticheat.export_all(real_present, out)

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


def topk_difference(a: dict, b: dict, tol: float) -> str | None:
    """Top-k logits (`topk_ids`, `topk_values`, one row per step) of a regenerated and a committed
    file: ids may change order, or enter and leave at the k-th place, only among values within `tol`
    (relative to the row's largest magnitude) of each other: a near-tie that rounding may flip."""
    for r, (ia, va, ib, vb) in enumerate(zip(a["topk_ids"], a["topk_values"], b["topk_ids"], b["topk_values"])):
        scale = max(float(np.abs(vb).max()), 1e-30) * tol
        ma, mb = dict(zip(ia.tolist(), va.tolist())), dict(zip(ib.tolist(), vb.tolist()))
        for i in set(ma) ^ set(mb):   # in one top-k only: must sit at the boundary
            kth = min(vb.min(), va.min())
            if (ma.get(i, mb.get(i)) - kth) > scale:
                return f"topk_ids: row {r}: id {i} is in one top-k only, {ma.get(i, mb.get(i)) - kth:.2e} above the k-th value"
        for j, (x, y) in enumerate(zip(ia, ib)):
            if x != y and abs(ma[x] - mb.get(x, ma[x])) > scale or (x != y and abs(va[j] - vb[j]) > scale):
                return f"topk_ids: row {r}: place {j} holds {x} regenerated, {y} committed, values not tied"
    return None


def tap_file_difference(new: Path, old: Path, new_record: dict, old_record: dict) -> str | None:
    """Why the regenerated taps file `new` is not equivalent to the committed `old` (their manifest
    records), or None when it is: the same tensors, each within rel_l2 ≤ noise_new + noise_old of the
    committed one, where noise is a tap's `noise.rel_l2`, llama.cpp's distance from an f64 evaluation
    (both are that close to the f64 result, so at most that far from each other). A llama.cpp rebuilt
    on another machine may round differently in the last bits (other SIMD paths); two results within
    that bound are equally good goldens, so --check reports them as equivalent rather than different.
    Integer tensors must be equal, but for top-k ids among near-tied logits (topk_difference)."""
    from safetensors.numpy import load_file

    a, b = load_file(str(new)), load_file(str(old))
    if set(a) != set(b):
        return f"tensor keys differ ({len(set(a) ^ set(b))} only on one side, e.g. {sorted(set(a) ^ set(b))[0]})"

    def rel_noise(record: dict) -> dict:
        return {t["key"]: (t.get("noise") or {}).get("rel_l2") for t in record.get("tensors", [])}

    na, nb = rel_noise(new_record), rel_noise(old_record)
    noise = {k: na[k] + nb[k] for k in nb if na.get(k) is not None and nb[k] is not None}
    # Tensors derived from the logits without a tap record of their own (`lse`, the log-sum-exp per
    # step) are judged by the logits' noise: the worst over the file's result_output taps.
    logits_noise = [v for k, v in noise.items() if k.endswith("/result_output") and v is not None]
    for k in sorted(b):
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"{k}: {x.dtype}{list(x.shape)} regenerated, {y.dtype}{list(y.shape)} committed"
        if np.array_equal(x, y, equal_nan=np.issubdtype(y.dtype, np.floating)):
            continue
        if k == "topk_ids" and "topk_values" in b and logits_noise:
            why = topk_difference(a, b, max(logits_noise))
            if why:
                return why
            continue
        if not np.issubdtype(y.dtype, np.floating):
            return f"{k}: integer values differ"
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        if not np.array_equal(np.isfinite(x64), np.isfinite(y64)):
            return f"{k}: non-finite values at other places"
        fin = np.isfinite(y64)
        rel = float(np.linalg.norm(x64[fin] - y64[fin]) / max(np.linalg.norm(y64[fin]), 1e-30))
        lim = noise.get(k)
        if lim is None and k in ("lse", "topk_values") and logits_noise:
            lim = max(logits_noise)
        if lim is None:
            return f"{k}: differs (rel_l2 {rel:.2e}) and its record holds no noise to judge by"
        if rel > lim:
            return f"{k}: rel_l2 {rel:.2e} from the committed tap, above the two runs' noise together ({lim:.2e}, each against f64)"
    return None


def differences(a: Path, b: Path) -> tuple[list[str], set[str]]:
    """Differences of the regenerated tree `a` from golden/ `b`, and the taps files that differ in
    bytes but are equivalent (tap_file_difference). manifest.json is compared by manifest_differences."""
    diffs, equivalent = [], set()
    records = lambda d: {f["path"]: f for f in json.loads((d / "manifest.json").read_text())["files"]}
    new_records, old_records = records(a), records(b)
    for name in GENERATED:
        if name == "manifest.json":
            continue
        pa, pb = a / name, b / name
        la = {p.relative_to(a) for p in pa.rglob("*") if p.is_file()} if pa.is_dir() else ({Path(name)} if pa.exists() else set())
        lb = {p.relative_to(b) for p in pb.rglob("*") if p.is_file()} if pb.is_dir() else ({Path(name)} if pb.exists() else set())
        for rel in sorted(la ^ lb):
            diffs.append(f"{rel}: only in {'regenerated' if rel in la else 'golden/'}")
        for rel in sorted(la & lb):
            if filecmp.cmp(a / rel, b / rel, shallow=False):
                continue
            new_rec, old_rec = new_records.get(str(rel)), old_records.get(str(rel))
            taps = new_rec and old_rec and old_rec.get("kind") == "taps"
            why = tap_file_difference(a / rel, b / rel, new_rec, old_rec) if taps else "differs"
            if why is None:
                equivalent.add(str(rel))
            else:
                diffs.append(f"{rel}: {why}")
    return diffs, equivalent


def manifest_differences(a: Path, b: Path, only: set[str] | None, equivalent: set[str]) -> list[str]:
    """manifest.json of `a` against `b`, restricted to the files of the models in `only` (all when
    None): their records, with every tensor's sha256 and noise, and the top-level fields other than
    the file list. The records of `equivalent` taps files may differ in their checksums and noise
    figures only (their data differs within llama.cpp's noise)."""
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    keep = lambda f: only is None or f.get("model") in only
    # with --only, the regenerated manifest names only those models
    top = lambda m, k: {i: v for i, v in m[k].items() if i in only} if only is not None and k == "models" else m.get(k)
    diffs = [f"manifest.json: top-level {k!r} differs" for k in sorted(set(ma) | set(mb)) if k != "files" and top(ma, k) != top(mb, k)]
    ra = {f["path"]: f for f in ma["files"] if keep(f)}
    rb = {f["path"]: f for f in mb["files"] if keep(f)}

    def comparable(r: dict, path: str) -> dict:
        if path not in equivalent:
            return r
        tensors = [{k: v for k, v in t.items() if k not in ("sha256", "noise")} for t in r.get("tensors", [])]
        return {**{k: v for k, v in r.items() if k != "sha256"}, "tensors": tensors}

    for path in sorted(set(ra) | set(rb)):
        if path not in ra or path not in rb:
            diffs.append(f"manifest.json: record {path} only in {'regenerated' if path in ra else 'golden/'}")
        elif comparable(ra[path], path) != comparable(rb[path], path):
            x, y = comparable(ra[path], path), comparable(rb[path], path)
            fields = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
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
            diffs, equivalent = differences(out, GOLDEN)
            if only is not None:
                # The regenerated manifest lists only those models' files: compare their records (noise
                # included) and the top-level fields, not the whole file.
                diffs = [d for d in diffs if any(m in d for m in only)]
            diffs += manifest_differences(out, GOLDEN, only, equivalent)
            for d in diffs:
                print(d)
            for e in sorted(equivalent):
                print(f"{e}: differs in its last bits, every tap within llama.cpp's own noise of golden/ (equivalent)")
            summary = "clean" if not equivalent else f"clean ({len(equivalent)} taps file(s) equivalent, not byte-equal)"
            print(f"check: {summary}" if not diffs else f"check: {len(diffs)} difference(s)")
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
