"""Per-tap distance between a dump and a golden, for a quick look (the verdict is `lockstep compare`'s).

    python -m lockstep_kit.diff DUMP.safetensors GOLDEN.safetensors [--top 15]

For every key both files hold: rel L2 = ||dump - golden|| / ||golden|| over the whole tensor, and the
worst row's (per token: the last axis is one row). Prints the worst taps and the first key, in graph
order, over --limit.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .golden import natural_key, split_key


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| in f64 (0 when both are zero, inf when only b is)."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    num, den = np.linalg.norm(a - b), np.linalg.norm(b)
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return float(num / den)


def row_rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """The largest rel L2 of one row (last axis) over all rows."""
    w = a.shape[-1]
    a, b = a.astype(np.float64).reshape(-1, w), b.astype(np.float64).reshape(-1, w)
    num = np.linalg.norm(a - b, axis=1)
    den = np.linalg.norm(b, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(den > 0, num / np.where(den > 0, den, 1), np.where(num > 0, np.inf, 0.0))
    return float(r.max()) if r.size else 0.0


def compare(dump: dict, golden: dict) -> list:
    """[(key, rel_l2, worst_row_rel_l2)] for the step keys both hold with the same shape, graph order."""
    out = []
    for key in sorted(set(dump) & set(golden), key=natural_key):
        step, _ = split_key(key)
        if step is None or dump[key].shape != golden[key].shape:
            continue
        out.append((key, rel_l2(dump[key], golden[key]), row_rel_l2(dump[key], golden[key])))
    return out


def main(argv=None):
    from safetensors.numpy import load_file

    ap = argparse.ArgumentParser(prog="python -m lockstep_kit.diff", description=__doc__.split("\n\n")[0])
    ap.add_argument("dump")
    ap.add_argument("golden")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--limit", type=float, default=1e-4, help="report the first key whose rel L2 is above this")
    args = ap.parse_args(argv)
    d, g = load_file(args.dump), load_file(args.golden)
    rows = compare(d, g)
    first = next((r for r in rows if r[1] > args.limit), None)
    print(f"{len(rows)} keys compared")
    print(f"first over {args.limit:g}: " + (f"{first[0]} rel_l2 {first[1]:.3g}" if first else "none"))
    print(f"{'key':36} {'rel_l2':>10} {'worst row':>10}")
    for key, r, rr in sorted(rows, key=lambda x: -x[1])[: args.top]:
        print(f"{key:36} {r:10.3g} {rr:10.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
