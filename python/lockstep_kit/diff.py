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
from .layout import token_axis


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
        step, tap = split_key(key)
        if step is None:
            continue
        d = dump[key]
        pos = golden.get(f"rows/{key}")
        if pos is not None and d.shape != golden[key].shape and d.ndim == 4:
            # a row-subset tap dumped whole: its kept rows (golden/README.md, "Row-subset taps")
            ax = token_axis(tap, golden[key].shape)
            if d.shape[ax] > int(pos.max()):
                d = np.take(d, pos.astype(np.int64), axis=ax)
        if d.shape != golden[key].shape:
            continue
        out.append((key, rel_l2(d, golden[key]), row_rel_l2(d, golden[key])))
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64).ravel()
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def logits_report(dump: dict, golden: dict) -> list:
    """Per step: (step, kl, top64_max_abs, lse_diff, argmax_dump, golden_next).

    kl = KL(golden || dump) over the full vocabulary where the golden has the step's full logits
    (None where it keeps only the top 64); top64_max_abs = max |dump - golden| over the golden's 64
    largest logits; lse_diff = dump's log-sum-exp minus the golden's ``lse``.
    """
    out = []
    steps = sorted({split_key(k)[0] for k in dump if k.endswith("/result_output")} - {None})
    for s in steps:
        d = dump[f"s{s}/result_output"].astype(np.float64).ravel()
        kl = None
        g_full = golden.get(f"s{s}/result_output")
        if g_full is not None and g_full.size == d.size:
            lp, lq = _log_softmax(g_full), _log_softmax(d)
            kl = float(np.sum(np.exp(lp) * (lp - lq)))
        top = lse = None
        if "topk_ids" in golden and s < golden["topk_ids"].shape[0]:
            ids, vals = golden["topk_ids"][s], golden["topk_values"][s].astype(np.float64)
            top = float(np.max(np.abs(d[ids] - vals)))
        if "lse" in golden and s < golden["lse"].shape[0]:
            m = d.max()
            lse = float(m + np.log(np.exp(d - m).sum()) - golden["lse"][s])
        nxt = int(golden["continuation"][s]) if "continuation" in golden else None
        out.append((s, kl, top, lse, int(d.argmax()), nxt))
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
    fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
    for s, kl, top, lse, am, nxt in logits_report(d, g):
        print(f"s{s} logits: KL(golden||dump) {fmt(kl)}, top-64 max |diff| {fmt(top)}, "
              f"lse diff {fmt(lse)}, argmax {am} (golden next token {nxt})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
