"""Per-tap relative L2 error of the outside engine (clean, f32 and f64) against llama.cpp's goldens.

    python measure_errors.py [--top 10] [--entries tiny-qwen2/exact/fox ...] [--markdown OUT.md]

rel_l2 = ||engine - golden||_2 / ||golden||_2 over the whole tensor (f64 arithmetic); `row_max` is the
largest per-row (per-token, last axis) rel_l2 of the tensor. Prints the worst taps per golden and engine
dtype. Real models are measured when their GGUF is in the cache (`lockstep fetch`), skipped otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads: see numpy_engine.py

import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy_engine  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("LOCKSTEP_CACHE", Path.home() / ".cache" / "lockstep"))

MODELS = {
    "tiny-qwen2": REPO / "golden/models/tiny-qwen2.q.gguf",
    "tiny-llama": REPO / "golden/models/tiny-llama.q.gguf",
    "qwen2.5-coder-0.5b": CACHE / "models/qwen2.5-coder-0.5b.gguf",
    "smollm2-135m": CACHE / "models/smollm2-135m.gguf",
}


def golden_path(entry: str) -> Path:
    return REPO / "golden/taps" / f"{entry}.safetensors"


def default_entries() -> list[str]:
    out = []
    for model in MODELS:
        for p in sorted((REPO / "golden/taps" / model / "exact").glob("*.safetensors")):
            out.append(f"{model}/exact/{p.stem}")
    return out


def errors(dump: dict[str, np.ndarray], golden: dict[str, np.ndarray]) -> list[tuple[str, float, float]]:
    """(key, rel_l2, worst row rel_l2) for every `s*/` key of the golden."""
    rows = []
    for k, g in golden.items():
        if not (k.startswith("s") and "/" in k):
            continue
        e = dump[k].astype(np.float64)
        g = g.astype(np.float64)
        rel = float(np.linalg.norm(e - g) / max(np.linalg.norm(g), 1e-300))
        e2 = e.reshape(-1, e.shape[-1])
        g2 = g.reshape(-1, g.shape[-1])
        gn = np.linalg.norm(g2, axis=1)
        dn = np.linalg.norm(e2 - g2, axis=1)
        ok = gn > 0
        row = float(np.max(dn[ok] / gn[ok])) if ok.any() else 0.0
        rows.append((k, rel, row))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--entries", nargs="*", default=None)
    ap.add_argument("--markdown", default=None, help="also write the tables to this markdown file")
    a = ap.parse_args(argv)
    entries = a.entries or default_entries()
    lines: list[str] = []
    loaded: dict[str, numpy_engine.Model] = {}
    for entry in entries:
        model = entry.split("/")[0]
        gguf_path = MODELS[model]
        if not gguf_path.is_file():
            msg = f"## {entry}\nskipped: {gguf_path} missing (run `lockstep fetch`)\n"
            print(msg)
            lines.append(msg)
            continue
        if model not in loaded:
            loaded.clear()
            loaded[model] = numpy_engine.Model(gguf_path)
        golden = load_file(str(golden_path(entry)))
        for dtype in ("f32", "f64"):
            t0 = time.time()
            dump = numpy_engine.run(gguf_path, golden_path(entry), dtype=dtype, model=loaded[model])
            secs = time.time() - t0
            errs = errors(dump, golden)
            errs.sort(key=lambda r: -r[1])
            worst_row = max(errs, key=lambda r: r[2])
            head = (f"## {entry} — {dtype} ({len(errs)} taps, {secs:.1f}s); max rel_l2 {errs[0][1]:.3g} at "
                    f"{errs[0][0]}; max per-row {worst_row[2]:.3g} at {worst_row[0]}")
            out = [head, "", "| tap | rel_l2 | worst row rel_l2 |", "|---|---|---|"]
            out += [f"| {k} | {r:.3g} | {w:.3g} |" for k, r, w in errs[: a.top]]
            text = "\n".join(out) + "\n"
            print(text)
            lines.append(text)
    if a.markdown:
        tmp = Path(a.markdown).with_suffix(".tmp")
        tmp.write_text("\n".join(lines))
        os.replace(tmp, a.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
