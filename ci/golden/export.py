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


def export_taps(llm: capture.LlamaCpp, out: Path, rel: str, *, model_id: str, model_sha256: str,
                model_file: str, tier: str, prompt: dict, rendered: str, tokens: list[int], n_layer: int,
                keep, dtype, full_layers: list[int], kept: str, tapped_steps: int,
                n_continue: int = CONTINUATION, progress: Callable[[int, int], None] | None = None) -> dict:
    """Runs `tokens` (the prefill, step 0), then greedy decode steps 1..tapped_steps with their taps and
    on to `n_continue` steps of continuation; writes `out/rel` (the taps `keep(step, tap)` accepts,
    stored as `dtype`) and returns its manifest record (without the file's sha256 and size, which the
    caller adds once every file is written)."""
    run = llm.run(tokens, tapped_steps, n_continue, progress=progress)
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
