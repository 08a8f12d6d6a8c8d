"""Dequantization goldens: what gguf-py's `gguf.quants.dequantize` makes of real tensor bytes.

For each model, `dequant/{model}.safetensors` holds, for every ggml type present in the model, samples
of a few whole blocks taken from the first tensor of that type and from the middle tensor of that type
(in file order), each at element 0 and at the middle element (rounded down to a block boundary):
- `{tensor}@{first_element}`: f32 `[n]`, the dequantized values (ggml order: ne[0] fastest);
- `{tensor}@{first_element}.raw`: u8 `[bytes]`, the block bytes they came from, so the Rust test can
  check its dequantizer without the model file.
The safetensors metadata `samples` (JSON) gives each sample's tensor, type, first element and count.

`dequant/{model}.json` maps every tensor name to {type, ne, n_elements, sha256}, where sha256 is over the
whole tensor dequantized to f32 little-endian (ggml order). Whole-tensor checks need the model file.

Usage: imported by main.py (`export`), or standalone:
`python ci/golden/dequant.py OUT_DIR [MODEL_ID=PATH ...]` (default: the two real models in the cache).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

BLOCKS_PER_SAMPLE = 4
MIN_ELEMENTS_PER_SAMPLE = 256   # plain types (block size 1) get at least this many elements


_ST_DTYPES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("uint8"): "U8",
              np.dtype("int32"): "I32", np.dtype("int64"): "I64"}


def save_sorted(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file whose bytes depend only on the inputs: header JSON with sorted keys (the
    `safetensors` package passes `metadata` through a Rust HashMap, so its order, and the file's bytes,
    change from run to run). Tensors are stored widest dtype first, then by name, so every tensor's data
    stays aligned to its element size; little-endian."""
    header: dict = {"__metadata__": {k: metadata[k] for k in sorted(metadata)}}
    blobs, offset = [], 0
    for name in sorted(tensors, key=lambda n: (-tensors[n].dtype.itemsize, n)):
        a = np.ascontiguousarray(tensors[name])
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        b = a.tobytes()
        header[name] = {"dtype": _ST_DTYPES[np.dtype(a.dtype.str.lstrip("<>|="))], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    tmp = Path(str(path) + ".partial")
    with open(tmp, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)
    tmp.replace(path)


def _raw_bytes(t) -> np.ndarray:
    """The tensor's bytes, flat uint8, exactly as stored in the file."""
    return np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)


def _dequant(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """`raw` (whole blocks) as f32, flat."""
    if qtype == GGMLQuantizationType.F32:
        return raw.view(np.float32).copy()
    return np.asarray(gguf.quants.dequantize(raw.reshape(1, -1), qtype), dtype=np.float32).reshape(-1)


def _samples(t, qtype: GGMLQuantizationType) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """first element → (values, raw bytes) for the samples of one tensor."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    n_el = int(np.prod([int(x) for x in t.shape]))
    n_blocks_total = n_el // bs
    n_blocks = max(BLOCKS_PER_SAMPLE, -(-MIN_ELEMENTS_PER_SAMPLE // bs))
    n_blocks = min(n_blocks, n_blocks_total)
    raw = _raw_bytes(t)
    assert raw.size == n_blocks_total * ts, (t.name, raw.size, n_blocks_total, ts)
    out = {}
    for first_block in sorted({0, max(0, min(n_blocks_total // 2, n_blocks_total - n_blocks))}):
        b = raw[first_block * ts:(first_block + n_blocks) * ts].copy()
        out[first_block * bs] = (_dequant(b, qtype), b)
    return out


def export_model(model_id: str, path: Path, out_dir: Path) -> list[dict]:
    reader = GGUFReader(path)
    by_type: dict[str, list] = {}
    for t in reader.tensors:
        by_type.setdefault(GGMLQuantizationType(t.tensor_type).name, []).append(t)

    tensors: dict[str, np.ndarray] = {}
    samples: dict[str, dict] = {}
    for tname in sorted(by_type):
        qtype = GGMLQuantizationType[tname]
        group = by_type[tname]
        picks = [group[0]] + ([group[len(group) // 2]] if len(group) > 1 else [])
        for t in picks:
            for first, (vals, raw) in _samples(t, qtype).items():
                key = f"{t.name}@{first}"
                tensors[key] = vals
                tensors[f"{key}.raw"] = raw
                samples[key] = {"tensor": t.name, "type": tname, "first_element": first,
                                "n_elements": int(vals.size)}

    checks: dict[str, dict] = {}
    for t in reader.tensors:
        qtype = GGMLQuantizationType(t.tensor_type)
        vals = _dequant(_raw_bytes(t), qtype)
        ne = [int(x) for x in t.shape]   # gguf-py's shape is ggml's ne order
        assert vals.size == int(np.prod(ne)), t.name
        checks[t.name] = {"type": qtype.name, "ne": ne, "n_elements": int(vals.size),
                          "sha256": hashlib.sha256(vals.astype("<f4").tobytes()).hexdigest()}

    d = out_dir / "dequant"
    d.mkdir(parents=True, exist_ok=True)
    st = d / f"{model_id}.safetensors"
    # Where the Rust test finds the model for the whole-tensor checks: a file inside the golden
    # directory (the tiny models), else the cache (`cache:{id}`, fetched by fetch::ensure_model).
    try:
        model_file = str(path.resolve().relative_to(out_dir.resolve()))
    except ValueError:
        model_file = f"cache:{model_id}"
    meta = {"model": model_id, "generator": "ci/golden/dequant.py", "gguf": _gguf_version(),
            "model_file": model_file, "model_sha256": _sha256_file(path),
            "samples": json.dumps(samples, sort_keys=True)}
    save_sorted(tensors, st, meta)
    js = d / f"{model_id}.json"
    js.write_text(json.dumps(checks, indent=1, sort_keys=True) + "\n")
    common = {"kind": "dequant", "model": model_id, "types": sorted(by_type),
              "command": "ci/regenerate-golden"}
    return [{"path": f"dequant/{model_id}.safetensors", "what": "samples", "n_samples": len(samples), **common},
            {"path": f"dequant/{model_id}.json", "what": "whole-tensor sha256", "n_tensors": len(checks), **common}]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _gguf_version() -> str:
    from importlib.metadata import version
    return version("gguf")


# Byte offsets of the f16 scale fields in one block, for the synthetic blocks (the real models do not
# hold every type: these cover F16, BF16, Q4_0, Q5_1, Q2_K, Q3_K, Q5_K too).
SYNTHETIC_F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
                        "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
SYNTHETIC_BLOCKS = 16
SYNTHETIC_SEED = 20250601


def export_synthetic(out_dir: Path) -> list[dict]:
    """`dequant/synthetic.safetensors`: for each type, `{TYPE}.raw` (u8, random blocks with finite
    random-signed f16 scales, fixed seed) and `{TYPE}` (f32, gguf-py's dequantization of them)."""
    rng = np.random.default_rng(SYNTHETIC_SEED)
    tensors: dict[str, np.ndarray] = {}
    for tname in ["F32", "F16", "BF16", *SYNTHETIC_F16_FIELDS]:
        qtype = GGMLQuantizationType[tname]
        bs, ts = GGML_QUANT_SIZES[qtype]
        if tname == "F32":
            raw = rng.standard_normal(SYNTHETIC_BLOCKS * 32).astype("<f4").view(np.uint8)
        elif tname == "F16":
            raw = rng.standard_normal(SYNTHETIC_BLOCKS * 32).astype("<f2").view(np.uint8)
        elif tname == "BF16":
            f = rng.standard_normal(SYNTHETIC_BLOCKS * 32).astype("<f4")
            raw = (f.view("<u4") >> 16).astype("<u2").view(np.uint8)
        else:
            raw = rng.integers(0, 256, size=(SYNTHETIC_BLOCKS, ts), dtype=np.uint8)
            for off in SYNTHETIC_F16_FIELDS[tname]:
                scale = (rng.standard_normal(SYNTHETIC_BLOCKS) * 0.05).astype("<f2")
                raw[:, off:off + 2] = scale.view(np.uint8).reshape(SYNTHETIC_BLOCKS, 2)
            raw = raw.reshape(-1)
        raw = np.ascontiguousarray(raw)
        tensors[tname] = _dequant(raw, qtype)
        tensors[f"{tname}.raw"] = raw
    d = out_dir / "dequant"
    d.mkdir(parents=True, exist_ok=True)
    save_sorted(tensors, d / "synthetic.safetensors",
                {"generator": "ci/golden/dequant.py", "seed": str(SYNTHETIC_SEED), "gguf": _gguf_version()})
    return [{"path": "dequant/synthetic.safetensors", "kind": "dequant", "model": "synthetic",
             "what": "random blocks of every supported type", "types": sorted(t for t in tensors if "." not in t),
             "command": "ci/regenerate-golden"}]


def export(models: dict[str, Path], out_dir: Path) -> list[dict]:
    """Writes the dequant goldens of every model whose file exists, and the synthetic blocks;
    returns manifest entries."""
    files = export_synthetic(out_dir)
    for model_id in sorted(models):
        path = Path(models[model_id])
        if not path.exists():
            print(f"dequant goldens: skipping {model_id}: {path} does not exist", file=sys.stderr)
            continue
        files += export_model(model_id, path, out_dir)
    return files


if __name__ == "__main__":
    out = Path(sys.argv[1])
    if len(sys.argv) > 2:
        ms = dict(a.split("=", 1) for a in sys.argv[2:])
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        import models as _m
        ms = {m: _m.cache_dir() / "models" / f"{m}.gguf" for m in _m.REAL}
    for f in export({k: Path(v) for k, v in ms.items()}, out):
        print(json.dumps(f, sort_keys=True))
