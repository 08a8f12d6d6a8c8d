"""One taps golden: run a prompt through llama.cpp (capture.py) and write its safetensors file and manifest
record. Shared by ci/regenerate-golden (main.py: the committed goldens, with their size policy) and
`lockstep golden` (ondemand.py: every tap of every layer, into the cache). Naming: golden/README.md.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import gguf
import llama_cpp as L
import safetensors

import capture
import models
from dequant import save_sorted
from ggufutil import write_f32_copy
from noise import token_axis   # the token axis of a tap, as src/checks/taps.rs token_axis

THREADS = 2
CONTINUATION = 32   # greedy continuation tokens recorded (topk_*, lse), whatever the tapped steps
TIERS = ["exact", "shipped"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


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


def exact_copy(src: Path, sha: str, log: Callable[[str], None] = log) -> Path:
    """The exact tier's F32 copy of the dequantized weights, cached by the model's sha256 outside the
    repository ($LOCKSTEP_CACHE/golden-work). Written under a temporary name, then renamed: a concurrent
    or interrupted writer never leaves a partial copy at the final name."""
    dst = models.cache_dir() / "golden-work" / f"{sha[:16]}.f32.gguf"
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        log(f"{src.name}: writing the exact tier's F32 copy of the dequantized weights ({dst}; once per model)")
        t0 = time.time()
        write_f32_copy(src, dst)
        log(f"{src.name}: F32 copy written, {dst.stat().st_size / 1e6:.0f} MB, {time.time() - t0:.1f} s")
    return dst


ROWS_PREFIX = "rows/"


def rows_key(key: str) -> str:
    """The key of the positions tensor of a row-subset tap `s{step}/{tap}`: `rows/s{step}/{tap}`."""
    return ROWS_PREFIX + key


def select_rows(tap_key: str, arr: np.ndarray, positions) -> list[int] | None:
    """The rows of `arr` a row-subset keeps: the listed positions (negative ones count from the end) that
    the tap has, ascending, along its token axis; None when that is every row (the tap is kept whole)."""
    ax = token_axis(tap_key, arr.shape)
    n = arr.shape[ax]
    rows = sorted({p + n if p < 0 else p for p in positions} & set(range(n)))
    return None if len(rows) == n else rows


def write_taps(out: Path, rel: str, run: capture.Run, keep, dtype, meta: dict) -> list[dict]:
    """One safetensors file: s{step}/{tap} (graph order recorded in the returned list), tokens,
    continuation, topk_ids, topk_values, lse.

    `keep(step, tap)`: False (not kept), True (kept whole) or a list of positions (a row-subset tap:
    golden/README.md, "Row-subset taps"): the tap keeps its key with only those rows along its token axis,
    and `rows/{key}` (i32 [R]) lists them; its manifest record adds `positions` and `full_shape`."""
    tensors: dict[str, np.ndarray] = {}
    listed = []
    row_lists: dict[str, np.ndarray] = {}
    for step, taps in enumerate(run.steps):
        for tap in taps:
            sel = keep(step, tap)
            if sel is False or sel is None:
                continue
            key = f"s{step}/{tap.key}"
            arr = tap.array
            rows = None if sel is True else select_rows(tap.key, arr, sel)
            subset = {}
            if rows is not None:
                subset = {"positions": rows, "full_shape": list(arr.shape)}
                arr = np.take(arr, rows, axis=token_axis(tap.key, arr.shape))
                row_lists[rows_key(key)] = np.array(rows, dtype=np.int32)
            arr = np.ascontiguousarray(arr, dtype=dtype)
            tensors[key] = arr
            listed.append({"key": key, "tap": tap.key, "name": tap.name, "op": tap.op,
                           "stage": "prefill" if step == 0 else "decode", "step": step, "layer": tap.layer,
                           "shape": list(arr.shape), "dtype": "F32" if dtype == np.float32 else "F16",
                           "sha256": sha256_bytes(arr.tobytes()), **subset})
    extra = {"tokens": np.array(run.tokens, dtype=np.int32),
             "continuation": np.array(run.continuation, dtype=np.int32),
             "topk_ids": run.topk_ids, "topk_values": run.topk_values, "lse": run.lse, **row_lists}
    for key, arr in extra.items():
        tensors[key] = arr
        listed.append({"key": key, "shape": list(arr.shape), "dtype": str(arr.dtype),
                       "sha256": sha256_bytes(arr.tobytes())})
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    save_sorted(tensors, path, {k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()})
    return listed


def export_taps(llm: capture.LlamaCpp, out: Path, rel: str, *, model_id: str, model_sha256: str,
                model_file: str, tier: str, prompt: dict, rendered: str, tokens: list[int], n_layer: int,
                keep, dtype, full_layers: list[int], kept: str, tapped_steps: int,
                n_continue: int = CONTINUATION, progress: Callable[[int, int], None] | None = None,
                select: Callable[[int, str], bool] | None = None) -> dict:
    """Runs `tokens` (the prefill, step 0), then greedy decode steps 1..tapped_steps with their taps and
    on to `n_continue` steps of continuation; writes `out/rel` (the taps `keep(step, tap)` accepts,
    stored as `dtype`; see write_taps) and returns its manifest record (without the file's sha256 and
    size, which the caller adds once every file is written). `select(step, name)`: the llama.cpp names
    worth copying out of the graph at all (capture.LlamaCpp.run; None: every node)."""
    run = llm.run(tokens, tapped_steps, n_continue, progress=progress, select=select)
    meta = {"model": model_id, "model_sha256": model_sha256, "tier": tier, "prompt_id": prompt["id"],
            "chat": prompt["chat"]}
    tensors = write_taps(out, rel, run, keep, dtype, meta)
    return {
        "path": rel, "kind": "taps", "model": model_id, "model_sha256": model_sha256,
        "model_file": model_file,
        "tier": tier, "prompt_id": prompt["id"], "chat": prompt["chat"],
        "prompt": prompt.get("messages") or prompt.get("text"), "rendered": rendered,
        "tokens": tokens, "continuation": run.continuation, "first_eog": run.first_eog,
        "steps": len(run.steps), "decode_steps": len(run.steps) - 1,
        "continuation_steps": n_continue, "n_layer": n_layer,
        "full_layers": full_layers,
        "kept": kept, "kv_cache": "f32" if tier == "exact" else "f16", "flash_attn": False,
        "weights": "F32 copy of the dequantized weights" if tier == "exact" else "as shipped",
        "tensors": tensors}


# The long-context golden (prompt `long`, prompts.long_code: > 1,024 positions with its continuation).
# A prefill of ~1,100 tokens cannot keep whole taps within golden/'s budget (qwen: one l_out is 3.7 MB,
# one kq 64 MB), so it keeps rows (golden/README.md, "Row-subset taps"), chosen to bracket the window
# lengths engines use or get wrong (64, 80, 128, 256, 512, 1,024: for a window of N the first affected
# position is N, so both N - 1 and N are kept):
#   step 0: embd and l_out of layers 0, 1, middle, n-2 at LONG_POSITIONS; l_out of the last layer, norm and
#           result_norm (one row: llama.cpp keeps the last token only); kq-0 and kq_soft_max-0 (the scores and
#           probabilities of layer 0, whole kv rows) at LONG_SCORE_POSITIONS;
#   decode steps 1..4 (one row each): embd, the same l_out layers, norm, result_norm;
#   logits: every step's top-64 and log-sum-exp (topk_*, lse), no full result_output.
# Exact tier only (f32): 0.9 MB for qwen2.5-coder-0.5b, 0.6 MB for smollm2-135m.
LONG_PROMPTS = ("long",)
LONG_TIERS = ("exact",)
LONG_POSITIONS = (0, 1, 63, 64, 79, 80, 81, 127, 128, 255, 256, 511, 512, 513, 767, 1023, -1)
LONG_SCORE_POSITIONS = (79, 80, 511, 512)


def long_layers(n_layer: int) -> list[int]:
    """0, 1, the middle layer, the one before the last, the last."""
    return sorted({0, 1, n_layer // 2, n_layer - 2, n_layer - 1})


def long_policy(n_layer: int, tier: str):
    """(keep, select, dtype, layers, description) of the long-context golden, as keep_policy in main.py
    (keep may return a list of positions: write_taps)."""
    dtype = np.float32 if tier == "exact" else np.float16
    layers = long_layers(n_layer)
    outs = {f"l_out-{L}" for L in layers}
    scores = {"kq-0", "kq_soft_max-0"}

    def select(step: int, name: str) -> bool:
        return name in outs or name in ("embd", "norm", "result_norm") or (step == 0 and name in scores)

    def keep(step: int, tap: capture.Tap):
        if not select(step, tap.name):
            return False
        if step > 0:
            return True
        return list(LONG_SCORE_POSITIONS) if tap.name in scores else list(LONG_POSITIONS)
    desc = (f"long context: at the prefill, embd and l_out of layers {layers} at positions "
            f"{list(LONG_POSITIONS)} (-1: the last prompt token; the last layer keeps that row only), kq-0 and "
            f"kq_soft_max-0 at positions {list(LONG_SCORE_POSITIONS)}, norm and result_norm; decode steps: "
            f"embd, those l_out, norm, result_norm; logits as top-64 and log-sum-exp only; stored "
            f"{np.dtype(dtype).name}")
    return keep, select, dtype, layers, desc


def context_for(n_tokens: int, n_continue: int) -> int:
    """The context llama.cpp is opened with for a prompt of n_tokens and its continuation: at least 512
    (the committed goldens' context), else rounded up to 256 positions."""
    return max(512, -(-(n_tokens + n_continue) // 256) * 256)


def finish_records(files: list[dict], out: Path, command: str) -> None:
    """Adds each file's sha256, size and generating command to its record."""
    for f in files:
        p = out / f["path"]
        f["sha256"] = models.sha256_file(p)
        f["bytes"] = p.stat().st_size
        f.setdefault("command", command)


def write_manifest(manifest: dict, out: Path) -> None:
    """manifest.json, sorted keys, through a temporary file renamed into place."""
    tmp = out / f".manifest.json.{os.getpid()}.partial"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out / "manifest.json")


TIER_DESCRIPTIONS = {"exact": "F32 copy of the dequantized weights, f32 KV cache, flash attention off, CPU",
                     "shipped": "file as shipped, default (f16) KV cache, flash attention off, CPU"}
