"""Tables and ratios of ci/bench-vs-llamacpp's runs (its environment says where they are).

Reads OUT/llama-ID-ROUND.json (llama-bench -o json) and OUT/lockstep-ID-ROUND.json (lockstep bench
--json); prints, per model and test, each round's t/s of both and the ratio lockstep ÷ llama.cpp
(of the means), then writes everything to OUT/bench-vs-llamacpp.json (temp file + rename).
"""

import json
import os
import statistics
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"bench-vs-llamacpp: {path}: {e}")


def test_name(r):
    return f"pp{r['n_prompt']}" if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0 else f"tg{r['n_gen']}"


def main():
    out, rounds = os.environ["OUT"], int(os.environ["ROUNDS"])
    models = [m for m in os.environ["MODELS"].splitlines() if m]
    rows, paths = [], {}
    for m in models:
        mid = os.path.basename(m)[: -len(".gguf")]
        per_test = {}
        for rnd in range(1, rounds + 1):
            for r in load(f"{out}/llama-{mid}-{rnd}.json"):
                per_test.setdefault(test_name(r), {"llama": [], "lockstep": []})["llama"].append(r)
            for r in load(f"{out}/lockstep-{mid}-{rnd}.json"):
                per_test.setdefault(r["test"], {"llama": [], "lockstep": []})["lockstep"].append(r)
                paths[r["test"]] = r.get("path", "")
            # the shipped tier's fast arithmetic (TF32 prefill, int8 decode), against the same
            # llama.cpp runs
            fast = f"{out}/lockstep-fast-{mid}-{rnd}.json"
            for r in load(fast) if os.path.exists(fast) else []:
                name = f"{r['test']} shipped-tier path"
                per_test.setdefault(name, {"llama": [], "lockstep": []})["lockstep"].append(r)
                paths[name] = r.get("path", "")
        for name in [t for t in per_test if t.endswith(" shipped-tier path")]:
            per_test[name]["llama"] = per_test[name.split(" ")[0]]["llama"]
        for test, runs in per_test.items():
            if not runs["llama"] or not runs["lockstep"]:
                sys.exit(f"bench-vs-llamacpp: {mid} {test}: a side has no result")
            ll = statistics.mean(r["avg_ts"] for r in runs["llama"])
            ls = statistics.mean(r["avg_ts"] for r in runs["lockstep"])
            rows.append(
                {
                    "model": mid,
                    "test": test,
                    "llama_cpp": [{"avg_ts": r["avg_ts"], "stddev_ts": r["stddev_ts"]} for r in runs["llama"]],
                    "lockstep": [{"avg_ts": r["avg_ts"], "stddev_ts": r["stddev_ts"]} for r in runs["lockstep"]],
                    "ratio": ls / ll,
                }
            )
    fmt = lambda runs: "; ".join(f"{r['avg_ts']:,.0f} ± {r['stddev_ts']:,.0f}" for r in runs)
    print(f"\ncard: {os.environ['CARD']} (sm_{os.environ['CC']}); lockstep commit {os.environ['COMMIT']}; {rounds} interleaved rounds")
    print("\n| model | test | llama.cpp t/s | lockstep t/s | lockstep ÷ llama.cpp |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['test']} | {fmt(r['llama_cpp'])} | {fmt(r['lockstep'])} | {r['ratio']:.2f}× |")
    print("\nlockstep's paths:")
    for t, p in sorted(paths.items()):
        print(f"- {t}: {p}")
    doc = {"card": os.environ["CARD"], "compute_capability": os.environ["CC"], "commit": os.environ["COMMIT"], "rounds": rounds, "results": rows, "lockstep_paths": paths}
    dst = f"{out}/bench-vs-llamacpp.json"
    with open(dst + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(dst + ".tmp", dst)
    print(f"\njson: {dst}")


if __name__ == "__main__":
    main()
