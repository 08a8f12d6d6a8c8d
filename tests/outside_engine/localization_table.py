"""Markdown tables of what `lockstep compare` says about the outside engine, for the notes:

    python localization_table.py            # clean margins + every planted bug on every available model

1. clean engine, f32 and f64, every exact golden: passed, and the largest `error / limit` of the tap checks;
2. planted bugs (f32, fox for tiny models, code for real ones): expected vs got (step, layer, tap, class id).
Same runs as test_outside_engine.py, printed instead of asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads: see numpy_engine.py
sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy_engine as ne  # noqa: E402
import test_outside_engine as t  # noqa: E402


def compare(model: ne.Model, entry: str, dtype: str, bug: str | None) -> dict:
    with tempfile.TemporaryDirectory() as d:
        taps = ne.run(model.path, t.REPO / "golden/taps" / f"{entry}.safetensors", dtype=dtype, bug=bug, model=model)
        ne.save_dump(taps, f"{d}/dump.safetensors")
        subprocess.run([str(t.LOCKSTEP), "compare", "--dump", f"{d}/dump.safetensors", "--golden", entry,
                        "--report", f"{d}/r"], cwd=t.REPO, capture_output=True, check=False)
        return json.loads(Path(f"{d}/r/report.json").read_text())["cases"][0]


def main() -> int:
    if not t.LOCKSTEP.is_file():
        print(f"lockstep binary {t.LOCKSTEP} missing", file=sys.stderr)
        return 2
    models = {m: ne.Model(p) for m, p in t.MODELS.items() if p.is_file()}
    for m, p in t.MODELS.items():
        if m not in models:
            print(f"(skipped {m}: {p} missing)")
    print("| golden | dtype | passed | worst tap check (error / limit) | first divergence |\n|---|---|---|---|---|")
    for m, model in models.items():
        for entry in t.exact_entries(m):
            for dtype in ("f32", "f64"):
                c = compare(model, entry, dtype, None)
                tap_checks = [x for x in c["checks"] if x["name"].startswith("taps:") and x.get("value") is not None]
                worst = max(tap_checks, key=lambda x: x["value"], default=None)
                w = f"{worst['value']:.3g} ({worst['name']})" if worst else "-"
                print(f"| {entry} | {dtype} | {c['passed']} | {w} | {c['first_divergence']} |")
    print("\n| model | bug | expected | got | value / limit | |\n|---|---|---|---|---|---|")
    for m, model in models.items():
        for b, bug in ne.BUGS.items():
            if model.cfg.arch not in bug.archs or (bug.models is not None and m not in bug.models):
                continue
            entry = f"{m}/exact/{bug.prompt}" if bug.prompt else t.BUG_ENTRIES[m]
            c = compare(model, entry, "f32", b)
            fd = c["first_divergence"] or {}
            w = ne.expected_localization(b, model.cfg.arch)
            exp = (w.step, w.layer, w.tap, w.class_id)
            got = (fd.get("step"), fd.get("layer"), fd.get("tap"), c.get("likely_class_id"))
            val = f"{fd.get('value') or 0:.3g} / {fd.get('limit') or 0:.3g}"
            print(f"| {m} | {b} | s{exp[0]} L{exp[1]} {exp[2]} {exp[3]} | s{got[0]} L{got[1]} {got[2]} {got[3]} "
                  f"| {val} | {'ok' if exp == got else 'WRONG'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
