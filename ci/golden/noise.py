"""llama.cpp's own rounding noise per golden tap: how far its f32 result lies from an f64 evaluation of
the same graph, on the same weights and the same tokens (prefill, then the golden's continuation fed
back one token at a time, as llama.cpp's decode steps were).

Why this estimate (golden/README.md, "Tolerances"): llama.cpp's CPU backend is deterministic (a fixed
thread count gives byte-identical goldens, and its f32 dot products do not change order with the thread
count), so its spread under threads or batch sizes is zero and says nothing about what a correct engine
may do. Its distance from the f64 value is its own rounding error; a correct f32 engine that sums in
another order lands about as far on the other side, so a tap's limit is k × this noise (k and a floor
live in the suite files, with the measured reason).

The f64 evaluation is tests/outside_engine/numpy_engine.py in f64 mode: an engine that shares no code
with engine/ (or with llama.cpp), written from the GGUF metadata and golden/README.md.

Usage (the golden venv or any Python with numpy, gguf, safetensors):
    python ci/golden/noise.py golden/manifest.json [--only MODEL...]
rewrites the manifest in place (temporary file + rename) with, for every tap tensor of every taps file,
`"noise": {"rel_l2": …, "row_max": …}`. regenerate-golden calls `annotate` on the manifest it writes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "outside_engine"))
import numpy_engine  # noqa: E402  (the independent f64 evaluation)

METHOD = ("distance of llama.cpp's tap from an f64 evaluation of the same graph on the same weights and "
          "tokens (tests/outside_engine/numpy_engine.py, dtype f64): rel_l2 over the tensor, row_max = the "
          "largest rel L2 of one token row")


# The row axis of a tap (one token a row), the same rule the runner uses (src/checks/taps.rs
# token_axis; tests/outside_engine checks the two agree): one home on the Python side.
token_axis = numpy_engine.token_axis


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| in f64 (b = the golden), as src/metrics.rs."""
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    d = float(np.sqrt(np.sum((a - b) ** 2)))
    n = float(np.sqrt(np.sum(b * b)))
    return d / n if n > 0 else d


def tap_noise(key: str, golden: np.ndarray, ref: np.ndarray) -> dict:
    whole = rel_l2(golden, ref)
    row_max = whole
    if golden.ndim == 4:
        ax = token_axis(key, golden.shape)
        g = np.moveaxis(golden.astype(np.float64), ax, 0).reshape(golden.shape[ax], -1)
        r = np.moveaxis(ref.astype(np.float64), ax, 0).reshape(golden.shape[ax], -1)
        row_max = max(rel_l2(r[i], g[i]) for i in range(g.shape[0]))
    return {"rel_l2": float(f"{whole:.3e}"), "row_max": float(f"{row_max:.3e}")}


def model_file(golden_dir: Path, entry: dict) -> Path:
    mf = entry.get("model_file") or ""
    p = golden_dir / mf
    if mf and p.is_file():
        return p
    cache = Path(os.environ.get("LOCKSTEP_CACHE", Path.home() / ".cache" / "lockstep"))
    p = cache / "models" / f"{entry['model']}.gguf"
    if not p.is_file():
        raise SystemExit(f"noise: {entry['path']}: model file {p} missing (run `lockstep fetch`)")
    return p


def annotate(manifest: dict, golden_dir: Path, only: set[str] | None = None, log=print) -> None:
    """Adds `noise` to every tap tensor of every taps file of `manifest` (in place)."""
    for entry in manifest["files"]:
        if entry.get("kind") != "taps" or (only and entry.get("model") not in only):
            continue
        t0 = time.time()
        gpath = golden_dir / entry["path"]
        golden = load_file(str(gpath))
        ref = numpy_engine.run(str(model_file(golden_dir, entry)), str(gpath), dtype="f64")
        worst = (0.0, "")
        for t in entry["tensors"]:
            key = t.get("key")
            if not key or "/" not in key or key not in golden or key.startswith("rows/"):
                continue   # not a tap (tokens, …, a row-subset tap's positions `rows/…`)
            if key not in ref:
                raise SystemExit(f"noise: {entry['path']}: the f64 evaluation did not produce {key}")
            t["noise"] = tap_noise(key, golden[key], ref[key])
            worst = max(worst, (t["noise"]["rel_l2"], key))
        log(f"noise {entry['path']}: worst {worst[1]} {worst[0]:.2e} ({time.time() - t0:.0f} s)")
    manifest["noise_method"] = METHOD


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifest", type=Path)
    ap.add_argument("--only", nargs="*", help="model ids (default: all)")
    args = ap.parse_args()
    manifest = json.loads(args.manifest.read_text())
    annotate(manifest, args.manifest.parent, set(args.only) if args.only else None)
    fd, tmp = tempfile.mkstemp(dir=args.manifest.parent, prefix=".manifest-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, args.manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
