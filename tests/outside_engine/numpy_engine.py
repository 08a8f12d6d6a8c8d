"""An independent "outside engine" for qwen2, llama and gemma3 GGUF models, in plain NumPy.

It shares no code with engine/ and was written from golden/README.md, the GGUF metadata and llama.cpp's
graph for qwen2/llama/gemma3 (gemma3: golden/README.md, "gemma3's taps"), so that `lockstep compare` can be tried the way an outside engine author uses it:
run the golden's prompt (step 0 = prefill of `tokens`), then teacher-forced single-token decode steps
(step k is fed `continuation[k-1]`) with this engine's own KV cache, and dump every tap the golden holds.

Precision modes:
  f32  plain NumPy/BLAS order: activations and weights float32, `x @ W.T` through BLAS sgemm;
  f64  every weight widened to float64 and every operation done in float64 (the "independent f64
       evaluation of the same graph" used to estimate llama.cpp's own rounding noise).

Planted bugs (`bug=NAME`, see BUGS) turn this correct engine into a realistically wrong one, each a class
of docs/bug-classes.md, with the step/layer/tap/class lockstep is expected to name.

CLI:  python numpy_engine.py --gguf M.gguf --golden G.safetensors --out dump.safetensors [--dtype f64]
                             [--bug NAME] [--list-bugs]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

# One BLAS thread unless the caller says otherwise (set before NumPy loads OpenBLAS): on the shared 2-core
# machine, 2-thread OpenBLAS ran a [24,576]x[576,1536] f64 matmul at 1.3 GFLOP/s against 21 GFLOP/s with one
# thread (busy-waiting threads under load). GEMM threads split the output, not the sums: results are the same.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import gguf  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

SUPPORTED_ARCHS = ("qwen2", "llama", "gemma3")
# The planted bugs are written into the qwen2/llama layer loop only.
BUG_ARCHS = ("qwen2", "llama")
# llama.cpp's rope type per architecture: qwen2 and gemma3 rotate (i, i + d/2) (NeoX), llama adjacent
# (2i, 2i+1) ("normal"; the GGUF converter permutes llama's Q/K rows so that this matches HF's rotate_half).
NEOX_ROPE = {"qwen2": True, "llama": False, "gemma3": True}
# gemma3 (llama.cpp's load_hparams for LLM_ARCH_GEMMA3): with a sliding window, every sixth layer is global
# (layer L slides when L % 6 < 5) and the sliding layers rotate with base 10000 (the file's rope.freq_base is
# the global layers'); queries are scaled by 1/sqrt(head_dim) before q·k (not for the 27B model, whose scale
# is 1/sqrt(n_embd / n_head): refused below).
GEMMA3_SWA_PATTERN = 6
GEMMA3_ROPE_BASE_SWA = 10000.0


class EngineError(Exception):
    """Bad input (model file, golden file, unknown bug): the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------------
# Planted bugs
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bug:
    name: str
    what: str
    step: int  # the step where lockstep should see the first divergence
    layer: int | None
    tap: str  # tap name without the `s{step}/` prefix
    class_id: str  # CONTEXT.md's stable class id
    archs: tuple[str, ...] = BUG_ARCHS
    # The model ids the bug applies to (None: every model of `archs`).
    models: tuple[str, ...] | None = None
    # The golden prompt that shows it (None: any; `long` for bugs that need > 80 positions).
    prompt: str | None = None


BUGS: dict[str, Bug] = {
    b.name: b
    for b in [
        Bug("rope_adjacent", "RoPE pairs swapped: adjacent (2i, 2i+1) on a NeoX model (qwen2), NeoX (i, i+d/2) on llama",
            0, 0, "Qcur-0.rope", "rope"),
        Bug("rope_base", "RoPE base 1e4 instead of the file's rope.freq_base", 0, 0, "Qcur-0.rope", "rope"),
        Bug("qkv_bias_dropped", "Q/K/V biases zeroed in the loader (qwen2)", 0, 0, "Qcur-0.add", "qkv_bias",
            archs=("qwen2",)),
        Bug("gqa_modulo", "GQA: kv head = q_head % n_kv instead of q_head // (n_head / n_kv)", 0, 0, "kq-0",
            "gqa_mapping"),
        Bug("kv_slot_off_by_one", "decode writes the new K/V one slot late (slot pos+1) and reads slots 0..pos",
            1, 0, "kq-0", "kv_cache"),
        Bug("attn_scale_1_over_d", "attention scale 1/d instead of 1/sqrt(d)", 0, 0, "kq_soft_max-0",
            "softmax_scale"),
        Bug("causal_mask_plus_one", "causal mask one too wide: prefill row i sees position i+1", 0, 0,
            "kq_soft_max-0", "causal_mask"),
        Bug("rms_eps", "RMSNorm epsilon 1e-5 where the file says 1e-6 (and 1e-6 where it says 1e-5)", 0, 0,
            "norm-0.rms_norm.0", "rms_norm"),
        Bug("weight_transposed", "attn_q.weight (square) used transposed: x @ Wq instead of x @ Wq.T", 0, 0,
            "Qcur-0.mul_mat", "projection_weight"),
        Bug("attn_output_transposed", "attn_output.weight (square) used transposed", 0, 0, "ffn_inp-0",
            "attn_output_projection"),
        Bug("residual_dropped", "attention output not added back: ffn_inp = attention output only", 0, 0,
            "ffn_inp-0", "residual_attn"),
        Bug("gelu_instead_of_silu", "SwiGLU with GELU (tanh form) instead of SiLU", 0, 0, "ffn_swiglu-0",
            "activation"),
        Bug("positions_off_by_one", "RoPE positions start at 1 instead of 0", 0, 0, "Qcur-0.rope", "rope"),
        # gemma3's gate is GELU (ffn_geglu): the slip the other way round.
        Bug("silu_instead_of_gelu", "GeGLU with SiLU instead of GELU (gemma3)", 0, 0, "ffn_geglu-0", "activation",
            archs=("gemma3",)),
        # A dequantization slip in one deep layer (qwen2.5-coder-0.5b: blk.2.ffn_down is the first Q4_K
        # ffn_down past layer 0). The real goldens keep layer 2's l_out only: the divergence must be
        # blamed on layer 2 as a whole, never on a formula the golden cannot show.
        Bug("q4k_min_sign_layer2", "blk.2.ffn_down.weight (Q4_K) dequantized with the wrong sign of min",
            0, 2, "l_out-2", "layer_data", archs=("qwen2",), models=("qwen2.5-coder-0.5b",)),
        # A sliding window (or KV length) of 80 where the model has none: position p sees p-79..p. Invisible
        # below 81 positions; the long-context goldens keep kq-0 and kq_soft_max-0 rows at 79, 80, 511, 512.
        Bug("attention_window_80", "attention limited to the last 80 positions (a sliding window / KV length "
            "of 80)", 0, 0, "kq_soft_max-0", "attention_window", models=("qwen2.5-coder-0.5b", "smollm2-135m"),
            prompt="long"),
    ]
}


def expected_localization(bug: str, arch: str) -> Bug:
    """The planted bug's expected first divergence, with the llama-only tap where qwen2's differs."""
    b = BUGS[bug]
    if bug == "attn_output_transposed" and arch == "llama":
        # llama names the output projection's result `attn_out-L`; qwen2 leaves it unnamed.
        return dataclasses.replace(b, tap="attn_out-0")
    return b


# ----------------------------------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    eps: float
    rope_base: float
    rope_dims: int
    # gemma3 only (defaults: none)
    sliding_window: int = 0  # a query at p sees keys p - window + 1 ..= p on sliding layers
    swa_pattern: int = 0  # layer L slides when swa_pattern > 0 and L % swa_pattern < swa_pattern - 1
    rope_base_swa: float = 0.0  # RoPE base of the sliding layers
    attn_scale: float = 0.0  # query scale before q·k (0: 1/sqrt(head_dim) applied to the scores)
    embd_scale: float = 0.0  # embeddings times this (0: none)

    def slides(self, layer: int) -> bool:
        return self.sliding_window > 0 and self.swa_pattern > 0 and layer % self.swa_pattern < self.swa_pattern - 1


def _field(reader: gguf.GGUFReader, key: str, path: Path, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is not None:
            return default
        raise EngineError(f"{path}: GGUF metadata key {key!r} missing")
    return f.contents()


def _cache_root() -> Path:
    base = Path(os.environ.get("LOCKSTEP_CACHE", Path.home() / ".cache" / "lockstep"))
    return base / "outside-engine"


def _file_sha256(path: Path) -> str:
    """The file's sha256, remembered per (name, size, mtime) so that a 0.5 GB model is hashed once."""
    st = path.stat()
    memo = _cache_root() / "sha256" / f"{path.name}-{st.st_size}-{st.st_mtime_ns}"
    if memo.is_file():
        sha = memo.read_text().strip()
        if len(sha) == 64:
            return sha
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    sha = h.hexdigest()
    _write_text_atomic(memo, sha + "\n")
    return sha


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Model:
    """A GGUF model's config and weights as float32 arrays in PyTorch layout (W: [out, in])."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise EngineError(f"{self.path}: model file does not exist")
        # gguf-py is slow on real models (dequantize in NumPy; the reader parses a 150k-token vocabulary):
        # the config and every tensor as float32 .npy are cached under outside-engine/{file sha256}/, and a
        # cached model is loaded without opening the GGUF again (tensors memory-mapped).
        self.cache_dir = _cache_root() / _file_sha256(self.path)
        meta = self.cache_dir / "model.json"
        if meta.is_file():
            info = json.loads(meta.read_text())
            self.cfg = Config(**info["config"])
            self.weights = {n: np.load(self.cache_dir / f"{n}.npy", mmap_mode="r") for n in info["tensors"]}
        else:
            self._load_gguf()
        if "output.weight" not in self.weights:  # tied embeddings
            self.weights["output.weight"] = self.weights["token_embd.weight"]

    def _load_gguf(self) -> None:
        try:
            reader = gguf.GGUFReader(self.path)
        except Exception as e:  # gguf raises ValueError/struct.error on a non-GGUF file
            raise EngineError(f"{self.path}: not a readable GGUF file ({e})") from e
        arch = _field(reader, "general.architecture", self.path)
        if arch not in SUPPORTED_ARCHS:
            raise EngineError(f"{self.path}: architecture {arch!r} not supported (only {SUPPORTED_ARCHS})")
        n_embd = int(_field(reader, f"{arch}.embedding_length", self.path))
        n_head = int(_field(reader, f"{arch}.attention.head_count", self.path))
        head_dim = int(_field(reader, f"{arch}.attention.key_length", self.path, n_embd // n_head))
        self.cfg = Config(
            arch=arch,
            n_layer=int(_field(reader, f"{arch}.block_count", self.path)),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=int(_field(reader, f"{arch}.attention.head_count_kv", self.path, n_head)),
            head_dim=head_dim,
            n_ff=int(_field(reader, f"{arch}.feed_forward_length", self.path)),
            eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", self.path)),
            rope_base=float(_field(reader, f"{arch}.rope.freq_base", self.path, 10000.0)),
            rope_dims=int(_field(reader, f"{arch}.rope.dimension_count", self.path, head_dim)),
        )
        if arch == "gemma3":
            n_layer = self.cfg.n_layer
            if _field(reader, "gemma3.final_logit_softcapping", self.path, 0.0):
                raise EngineError(f"{self.path}: final logit soft-capping not supported")
            if n_layer == 62:  # llama.cpp's LLM_TYPE_27B: another query scale
                raise EngineError(f"{self.path}: gemma3 27B (62 layers) not supported")
            window = int(_field(reader, "gemma3.attention.sliding_window", self.path, 0))
            self.cfg.sliding_window = window
            self.cfg.swa_pattern = GEMMA3_SWA_PATTERN if window > 0 else 0
            self.cfg.rope_base_swa = GEMMA3_ROPE_BASE_SWA
            self.cfg.attn_scale = 1.0 / float(np.sqrt(head_dim))
            self.cfg.embd_scale = float(np.sqrt(n_embd))
            if reader.fields.get("gemma3.rope.scaling.type") is not None:
                raise EngineError(f"{self.path}: RoPE scaling not supported")
        if self.cfg.rope_dims != head_dim:
            raise EngineError(f"{self.path}: partial RoPE (rope.dimension_count {self.cfg.rope_dims} != head dim "
                              f"{head_dim}) not supported")
        self.weights = {}
        for t in reader.tensors:
            shape = tuple(int(n) for n in reversed(t.shape))  # ggml ne reversed: [out, in]
            if t.tensor_type == gguf.GGMLQuantizationType.F32:
                arr = np.asarray(t.data, dtype=np.float32)
            else:
                arr = gguf.quants.dequantize(t.data, t.tensor_type)
            arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(shape)
            _save_npy_atomic(self.cache_dir / f"{t.name}.npy", arr)
            self.weights[t.name] = arr
        info = {"source": str(self.path), "config": dataclasses.asdict(self.cfg), "tensors": list(self.weights)}
        _write_text_atomic(self.cache_dir / "model.json", json.dumps(info, indent=1))

    def q4k_min_sign_flipped(self, name: str) -> np.ndarray:
        """The Q4_K tensor `name` dequantized with the sign of its block mins flipped: each element is
        d·sc·q − dmin·m; with every 4-bit q zeroed the block dequantizes to −dmin·m alone, so the wrong
        sign (d·sc·q + dmin·m) is the right value minus twice that."""
        t = next((t for t in gguf.GGUFReader(self.path).tensors if t.name == name), None)
        if t is None or t.tensor_type != gguf.GGMLQuantizationType.Q4_K:
            raise EngineError(f"{self.path}: {name} is not a Q4_K tensor")
        blocks = np.array(t.data, dtype=np.uint8).reshape(-1, 144)  # d, dmin (f16), 12 scale bytes, 128 qs
        blocks[:, 16:] = 0
        mins = gguf.quants.dequantize(blocks.reshape(t.data.shape), t.tensor_type)
        return (self.w(name) - 2.0 * np.asarray(mins, np.float32).reshape(self.w(name).shape)).astype(np.float32)

    def w(self, name: str) -> np.ndarray:
        try:
            return self.weights[name]
        except KeyError:
            raise EngineError(f"{self.path}: tensor {name!r} missing") from None


# ----------------------------------------------------------------------------------------------------
# Golden reading
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GoldenSpec:
    tokens: np.ndarray  # i32 [n]
    continuation: np.ndarray  # i32 [32]
    shapes: dict[str, tuple[int, ...]]  # every `s{k}/{tap}` key -> 4-D shape
    n_steps: int  # steps 0..n_steps-1
    # Row-subset taps (golden/README.md, "Row-subset taps"): `s{k}/{tap}` -> the positions it keeps (from
    # `rows/s{k}/{tap}`), along the tap's token axis; its shape above is the subset's.
    rows: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def read_golden(path: str | os.PathLike) -> GoldenSpec:
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"{path}: golden file does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
            for k in ("tokens", "continuation"):
                if k not in keys:
                    raise EngineError(f"{path}: golden has no {k!r} key")
            tokens = f.get_tensor("tokens").astype(np.int64)
            continuation = f.get_tensor("continuation").astype(np.int64)
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys if k.startswith("s") and "/" in k}
            rows = {k[len("rows/"):]: f.get_tensor(k).astype(np.int64) for k in keys if k.startswith("rows/")}
    except EngineError:
        raise
    except Exception as e:
        raise EngineError(f"{path}: not a readable safetensors file ({e})") from e
    steps = {int(k.split("/", 1)[0][1:]) for k in shapes}
    n_steps = max(steps) + 1 if steps else 1
    if n_steps - 1 > len(continuation):
        raise EngineError(f"{path}: {n_steps} steps but only {len(continuation)} continuation tokens")
    return GoldenSpec(tokens=tokens, continuation=continuation, shapes=shapes, n_steps=n_steps, rows=rows)


def token_axis(tap: str, shape: tuple[int, ...]) -> int:
    """The token axis of a 4-D tap (golden/README.md; a row is one token): 2 for activations [1, 1, T, W]
    and the heads-first kq, kq_soft_max, kqv; 1 for per-head taps [1, T, heads, head_dim] (after RoPE,
    Q/K/V split into heads, gemma3's Qcur_normed/Kcur_normed and their RMSNorm), told by name or by shape
    (tokens on axis 1, or several rows on axis 2 at a decode step, which holds one token). `tap` is a tap
    name or a key `s{step}/...` (without the step: a prefill)."""
    step_part, _, name = tap.rpartition("/")
    step = int(step_part[1:]) if step_part.startswith("s") and step_part[1:].isdigit() else 0
    head, _, stage = name.partition(".")
    fam = head.rsplit("-", 1)[0] if head.rsplit("-", 1)[-1].isdigit() else head
    if len(shape) != 4 or fam in ("kq", "kq_soft_max", "kqv"):
        return 2
    per_head_name = stage == "rope" or fam in ("Qcur_normed", "Kcur_normed")
    return 1 if per_head_name or shape[1] != 1 or (step > 0 and shape[2] != 1) else 2


# ----------------------------------------------------------------------------------------------------
# The forward pass
# ----------------------------------------------------------------------------------------------------


class TapLog:
    """Collects one step's named graph results and names them the way golden/README.md says:
    a name used once stays bare, a repeated name gets `.{op}`, a repeated (name, op) gets `.{op}.{k}`."""

    def __init__(self, want=None):
        self.items: list[tuple[str, str, np.ndarray | None]] = []
        # want(name): whether to keep a copy of that name's results (None: all). Every result is still
        # listed, so that keys come out the same; a long prefill's every tap would not fit in memory.
        self.want = want

    def add(self, name: str, op: str, value: np.ndarray) -> None:
        keep = self.want is None or self.want(name)
        self.items.append((name, op, np.array(value, copy=True) if keep else None))

    def named(self) -> dict[str, np.ndarray]:
        from collections import Counter

        by_name = Counter(n for n, _, _ in self.items)
        by_pair = Counter((n, op) for n, op, _ in self.items)
        seen: Counter = Counter()
        out: dict[str, np.ndarray] = {}
        for name, op, value in self.items:
            if by_name[name] == 1:
                key = name
            elif by_pair[(name, op)] == 1:
                key = f"{name}.{op}"
            else:
                key = f"{name}.{op}.{seen[(name, op)]}"
                seen[(name, op)] += 1
            out[key] = value
        return {k: v for k, v in out.items() if v is not None}


def _act(x: np.ndarray) -> np.ndarray:
    """[T, n] activation -> golden layout [1, 1, T, n]."""
    return x.reshape(1, 1, *x.shape)


class Engine:
    def __init__(self, model: Model, dtype: str = "f32", bug: str | None = None):
        if dtype not in ("f32", "f64"):
            raise EngineError(f"dtype {dtype!r}: expected 'f32' or 'f64'")
        if bug is not None:
            if bug not in BUGS:
                raise EngineError(f"unknown bug {bug!r}; known: {', '.join(BUGS)}")
            if model.cfg.arch not in BUGS[bug].archs:
                raise EngineError(f"bug {bug!r} does not apply to architecture {model.cfg.arch!r}")
        self.m = model
        self.cfg = model.cfg
        self.dt = np.float32 if dtype == "f32" else np.float64
        self.bug = bug
        self._wcache: dict[str, np.ndarray] = {}
        c = self.cfg
        self.eps = c.eps
        if bug == "rms_eps":
            self.eps = 1e-5 if c.eps < 5e-6 else 1e-6
        self.rope_base = 1e4 if bug == "rope_base" else c.rope_base
        self.neox = NEOX_ROPE[c.arch] != (bug == "rope_adjacent")
        self.group = c.n_head // c.n_head_kv
        self.k_cache: list[np.ndarray] = []  # per layer [n_ctx, n_kv, d]
        self.v_cache: list[np.ndarray] = []
        self.n_past = 0

    def W(self, name: str) -> np.ndarray:
        """A norm weight or bias in the compute dtype (widened once for f64). Matrices go through matmul."""
        w = self._wcache.get(name)
        if w is None:
            w = np.ascontiguousarray(self.m.w(name), dtype=self.dt)
            if self.bug == "qkv_bias_dropped" and name.endswith(("attn_q.bias", "attn_k.bias", "attn_v.bias")):
                w = np.zeros_like(w)
            self._wcache[name] = w
        return w

    def has(self, name: str) -> bool:
        return name in self.m.weights

    def alloc_cache(self, n_ctx: int) -> None:
        c = self.cfg
        self.k_cache = [np.zeros((n_ctx, c.n_head_kv, c.head_dim), self.dt) for _ in range(c.n_layer)]
        self.v_cache = [np.zeros((n_ctx, c.n_head_kv, c.head_dim), self.dt) for _ in range(c.n_layer)]
        self.n_past = 0

    # --- ops -------------------------------------------------------------------------------------

    def rms(self, x: np.ndarray) -> np.ndarray:
        """[T, n] -> [T, n], no weight."""
        ms = np.mean(x * x, axis=-1, keepdims=True)
        return x / np.sqrt(ms + self.dt(self.eps))

    def matmul(self, x: np.ndarray, wname: str) -> np.ndarray:
        """x [T, in] @ W.T, W [out, in] -> [T, out]."""
        w = self.m.w(wname)  # float32 [out, in], possibly memory-mapped
        if self.bug == "q4k_min_sign_layer2" and wname == "blk.2.ffn_down.weight":
            w = self.m.q4k_min_sign_flipped(wname)
        if (self.bug == "weight_transposed" and wname.endswith("attn_q.weight")) or (
            self.bug == "attn_output_transposed" and wname.endswith("attn_output.weight")
        ):
            if w.shape[0] != w.shape[1]:
                raise EngineError(f"bug {self.bug}: {wname} is not square {w.shape}")
            w = w.T
        if self.dt == np.float32:
            return x @ w.T
        # f64: W widened block by block into one reused buffer (widening a real model's 2 GB of weights at
        # once costs seconds of page faults on fresh memory); each output element is still one f64 dot product.
        out = np.empty((x.shape[0], w.shape[0]), np.float64)
        rows = max(1, (1 << 22) // max(1, w.shape[1]))  # 4M doubles per block
        buf = np.empty((min(rows, w.shape[0]), w.shape[1]), np.float64)
        for i in range(0, w.shape[0], rows):
            n = min(rows, w.shape[0] - i)
            np.copyto(buf[:n], w[i : i + n])
            out[:, i : i + n] = x @ buf[:n].T
        return out

    def rope(self, x: np.ndarray, positions: np.ndarray, base: float | None = None) -> np.ndarray:
        """x [T, heads, d] rotated at `positions` [T] (base: the layer's, when not the model's)."""
        d = self.cfg.head_dim
        pos = positions.astype(np.float64)
        if self.bug == "positions_off_by_one":
            pos = pos + 1.0
        inv_freq = (base or self.rope_base) ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # [d/2]
        theta = pos[:, None] * inv_freq[None, :]  # [T, d/2]
        cos = np.cos(theta).astype(self.dt)[:, None, :]  # [T, 1, d/2]
        sin = np.sin(theta).astype(self.dt)[:, None, :]
        if self.neox:
            x0, x1 = x[..., : d // 2], x[..., d // 2 :]
        else:
            x0, x1 = x[..., 0::2], x[..., 1::2]
        r0 = x0 * cos - x1 * sin
        r1 = x0 * sin + x1 * cos
        out = np.empty_like(x)
        if self.neox:
            out[..., : d // 2], out[..., d // 2 :] = r0, r1
        else:
            out[..., 0::2], out[..., 1::2] = r0, r1
        return out

    def silu(self, g: np.ndarray) -> np.ndarray:
        if self.bug == "gelu_instead_of_silu":
            c = self.dt(np.sqrt(2.0 / np.pi))
            return self.dt(0.5) * g * (self.dt(1.0) + np.tanh(c * (g + self.dt(0.044715) * g * g * g)))
        return g / (self.dt(1.0) + np.exp(-g))

    def gelu(self, g: np.ndarray) -> np.ndarray:
        """GELU, tanh form (gemma3's gelu_pytorch_tanh; ggml's GELU)."""
        if self.bug == "silu_instead_of_gelu":
            return g / (self.dt(1.0) + np.exp(-g))
        c = self.dt(np.sqrt(2.0 / np.pi))
        return self.dt(0.5) * g * (self.dt(1.0) + np.tanh(c * (g + self.dt(0.044715) * g * g * g)))

    def attend(self, log: TapLog, L: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int,
               scale: float, window: int = 0) -> np.ndarray:
        """Writes k, v [T, Hkv, d] to the cache at p0..; q [T, H, d] attends (scores times `scale`, a causal
        mask, and a sliding `window` when > 0); logs kq, kq_soft_max, kqv, kqv_out. Returns [T, H*d]."""
        c = self.cfg
        T = q.shape[0]
        H, d = c.n_head, c.head_dim
        positions = np.arange(p0, p0 + T)
        kv_len = p0 + T
        self.k_cache[L][p0 : p0 + T] = k
        self.v_cache[L][p0 : p0 + T] = v
        kv_of_head = np.arange(H) // self.group
        Kh = self.k_cache[L][:kv_len].transpose(1, 0, 2)[kv_of_head]  # [H, kv, d]
        Vh = self.v_cache[L][:kv_len].transpose(1, 0, 2)[kv_of_head]
        kq = q.transpose(1, 0, 2) @ Kh.transpose(0, 2, 1)  # [H, T, kv], unmasked
        log.add(f"kq-{L}", "mul_mat", kq[None])
        keys = np.arange(kv_len)[None, :]
        visible = keys <= positions[:, None]  # [T, kv]
        if window > 0:
            visible &= keys > positions[:, None] - window
        s = np.where(visible[None], kq * self.dt(scale), -np.inf)
        e = np.exp(s - np.max(s, axis=-1, keepdims=True))
        prob = e / np.sum(e, axis=-1, keepdims=True)  # masked entries exactly 0
        log.add(f"kq_soft_max-{L}", "soft_max", prob[None])
        kqv = prob @ Vh  # [H, T, d]
        log.add(f"kqv-{L}", "mul_mat", kqv[None])
        merged = kqv.transpose(1, 0, 2).reshape(T, H * d)
        log.add(f"kqv_out-{L}", "cont", _act(merged))
        return merged

    def step_gemma3(self, token_ids: np.ndarray, want=None) -> dict[str, np.ndarray]:
        """One step of llama.cpp's gemma3 graph (golden/README.md, "gemma3's taps"): embeddings scaled by
        sqrt(n_embd); per layer RMSNorm, Q/K/V, an RMSNorm of each Q and K head (own weights), RoPE (the
        sliding layers' base), queries scaled by 1/sqrt(head_dim) before q·k (so `kq` holds scaled scores),
        a sliding window on five of six layers, the output projection, a post-attention RMSNorm, the
        residual (`sa_out`), the FFN with a GELU gate, a post-FFN RMSNorm, the residual (`l_out`). The RMSNorm
        before `ffn_post_norm-L` is named `norm` without a layer, as llama.cpp names it."""
        c = self.cfg
        T = len(token_ids)
        p0 = self.n_past
        positions = np.arange(p0, p0 + T)
        log = TapLog(want)
        H, Hkv, d = c.n_head, c.n_head_kv, c.head_dim

        def norm(x: np.ndarray, weight: str, name: str, layer_name: str) -> np.ndarray:
            n = self.rms(x)
            log.add(layer_name, "rms_norm", n if n.ndim == 4 else _act(n))
            h = n * self.W(weight)
            log.add(name, "mul", h if h.ndim == 4 else _act(h))
            return h

        x = np.asarray(self.m.w("token_embd.weight")[token_ids], dtype=self.dt)  # [T, E]
        log.add("embd", "get_rows", _act(x))
        x = x * self.dt(c.embd_scale)
        log.add("inp_scaled", "scale", _act(x))
        for L in range(c.n_layer):
            p = f"blk.{L}."
            h = norm(x, p + "attn_norm.weight", f"attn_norm-{L}", f"norm-{L}")
            q = self.matmul(h, p + "attn_q.weight")  # [T, H*d]
            log.add(f"Qcur-{L}", "mul_mat", _act(q))
            q = norm(q.reshape(1, T, H, d), p + "attn_q_norm.weight", f"Qcur_normed-{L}", f"norm-{L}")[0]
            slides = c.slides(L)
            base = c.rope_base_swa if slides else c.rope_base
            q = self.rope(q, positions, base)  # [T, H, d]
            log.add(f"Qcur-{L}", "rope", q[None])
            k = self.matmul(h, p + "attn_k.weight")
            log.add(f"Kcur-{L}", "mul_mat", _act(k))
            k = norm(k.reshape(1, T, Hkv, d), p + "attn_k_norm.weight", f"Kcur_normed-{L}", f"norm-{L}")[0]
            k = self.rope(k, positions, base)
            log.add(f"Kcur-{L}", "rope", k[None])
            v = self.matmul(h, p + "attn_v.weight")
            log.add(f"Vcur-{L}", "mul_mat", _act(v))
            merged = self.attend(log, L, q * self.dt(c.attn_scale), k, v.reshape(T, Hkv, d), p0, 1.0,
                                 c.sliding_window if slides else 0)
            a = self.matmul(merged, p + "attn_output.weight")  # [T, E], unnamed in llama.cpp
            resid = x
            if L == c.n_layer - 1:  # llama.cpp keeps only the last token from here on in the last layer
                a, resid = a[-1:], resid[-1:]
            a = norm(a, p + "post_attention_norm.weight", f"attn_post_norm-{L}", f"norm-{L}")
            sa = a + resid
            log.add(f"sa_out-{L}", "add", _act(sa))
            h = norm(sa, p + "ffn_norm.weight", f"ffn_norm-{L}", f"norm-{L}")
            g = self.matmul(h, p + "ffn_gate.weight")  # [T, F]
            log.add(f"ffn_gate-{L}", "mul_mat", _act(g))
            u = self.matmul(h, p + "ffn_up.weight")
            log.add(f"ffn_up-{L}", "mul_mat", _act(u))
            gg = self.gelu(g) * u
            log.add(f"ffn_geglu-{L}", "geglu", _act(gg))
            f = self.matmul(gg, p + "ffn_down.weight")  # [T, E]
            log.add(f"ffn_out-{L}", "mul_mat", _act(f))
            f = norm(f, p + "post_ffw_norm.weight", f"ffn_post_norm-{L}", "norm")
            x = f + sa
            log.add(f"l_out-{L}", "add", _act(x))
        x = x[-1:]
        h = norm(x, "output_norm.weight", "result_norm", "norm")
        logits = self.matmul(h, "output.weight")  # [1, vocab] (tied: token_embd)
        log.add("result_output", "mul_mat", _act(logits))
        self.n_past += T
        return log.named()

    # --- one step ---------------------------------------------------------------------------------

    def step(self, token_ids: np.ndarray, want=None) -> dict[str, np.ndarray]:
        """Runs `token_ids` [T] at positions n_past.., appends to the KV cache; returns named taps (those
        whose llama.cpp name `want(name)` accepts; None: all)."""
        if self.cfg.arch == "gemma3":
            return self.step_gemma3(token_ids, want)
        c = self.cfg
        T = len(token_ids)
        p0 = self.n_past
        positions = np.arange(p0, p0 + T)
        kv_len = p0 + T
        log = TapLog(want)
        H, Hkv, d = c.n_head, c.n_head_kv, c.head_dim

        x = np.asarray(self.m.w("token_embd.weight")[token_ids], dtype=self.dt)  # [T, E]
        log.add("embd", "get_rows", _act(x))

        for L in range(c.n_layer):
            last = L == c.n_layer - 1
            p = f"blk.{L}."
            n = self.rms(x)
            log.add(f"norm-{L}", "rms_norm", _act(n))
            h = n * self.W(p + "attn_norm.weight")
            log.add(f"attn_norm-{L}", "mul", _act(h))

            qkv = {}
            for name, wn, heads in (("Qcur", "attn_q", H), ("Kcur", "attn_k", Hkv), ("Vcur", "attn_v", Hkv)):
                y = self.matmul(h, p + wn + ".weight")  # [T, heads*d]
                log.add(f"{name}-{L}", "mul_mat", _act(y))
                if self.has(p + wn + ".bias"):
                    y = y + self.W(p + wn + ".bias")
                    log.add(f"{name}-{L}", "add", _act(y))
                qkv[name] = y.reshape(T, heads, d)
            q = self.rope(qkv["Qcur"], positions)  # [T, H, d]
            log.add(f"Qcur-{L}", "rope", q.reshape(1, T, H, d))
            k = self.rope(qkv["Kcur"], positions)  # [T, Hkv, d]
            log.add(f"Kcur-{L}", "rope", k.reshape(1, T, Hkv, d))
            v = qkv["Vcur"]

            # KV cache write. Bug: a decode step writes one slot late (the prefill is right).
            slot = p0 + 1 if (self.bug == "kv_slot_off_by_one" and T == 1 and p0 > 0) else p0
            self.k_cache[L][slot : slot + T] = k
            self.v_cache[L][slot : slot + T] = v
            K = self.k_cache[L][:kv_len]  # [kv, Hkv, d]
            V = self.v_cache[L][:kv_len]

            if self.bug == "gqa_modulo":
                kv_of_head = np.arange(H) % Hkv
            else:
                kv_of_head = np.arange(H) // self.group
            Kh = K.transpose(1, 0, 2)[kv_of_head]  # [H, kv, d]
            Vh = V.transpose(1, 0, 2)[kv_of_head]  # [H, kv, d]
            Qh = q.transpose(1, 0, 2)  # [H, T, d]
            kq = Qh @ Kh.transpose(0, 2, 1)  # [H, T, kv], unscaled, unmasked
            log.add(f"kq-{L}", "mul_mat", kq[None])

            scale = 1.0 / d if self.bug == "attn_scale_1_over_d" else 1.0 / np.sqrt(d)
            # visible[t, j]: query t (position p0+t) sees key j <= p0+t
            reach = 1 if self.bug == "causal_mask_plus_one" else 0
            visible = np.arange(kv_len)[None, :] <= (positions[:, None] + reach)  # [T, kv]
            if self.bug == "attention_window_80":
                visible &= np.arange(kv_len)[None, :] > (positions[:, None] - 80)
            s = kq * self.dt(scale)
            s = np.where(visible[None], s, -np.inf)
            s = s - np.max(s, axis=-1, keepdims=True)
            e = np.exp(s)
            prob = e / np.sum(e, axis=-1, keepdims=True)  # [H, T, kv], masked entries exactly 0
            log.add(f"kq_soft_max-{L}", "soft_max", prob[None])
            kqv = prob @ Vh  # [H, T, d]
            log.add(f"kqv-{L}", "mul_mat", kqv[None])
            merged = kqv.transpose(1, 0, 2).reshape(T, H * d)  # [T, H*d]
            log.add(f"kqv_out-{L}", "cont", _act(merged))
            a = self.matmul(merged, p + "attn_output.weight")  # [T, E]
            if self.has(p + "attn_output.bias"):
                a = a + self.W(p + "attn_output.bias")
            if c.arch == "llama":
                log.add(f"attn_out-{L}", "mul_mat", _act(a))  # qwen2 leaves this node unnamed

            resid = x
            if last:  # llama.cpp keeps only the last token from here on in the last layer
                a, resid = a[-1:], resid[-1:]
            f_in = a if self.bug == "residual_dropped" else a + resid
            log.add(f"ffn_inp-{L}", "add", _act(f_in))

            n = self.rms(f_in)
            log.add(f"norm-{L}", "rms_norm", _act(n))
            h = n * self.W(p + "ffn_norm.weight")
            log.add(f"ffn_norm-{L}", "mul", _act(h))
            g = self.matmul(h, p + "ffn_gate.weight")  # [T, F]
            log.add(f"ffn_gate-{L}", "mul_mat", _act(g))
            u = self.matmul(h, p + "ffn_up.weight")
            log.add(f"ffn_up-{L}", "mul_mat", _act(u))
            sw = self.silu(g) * u
            log.add(f"ffn_swiglu-{L}", "glu", _act(sw))
            f_out = self.matmul(sw, p + "ffn_down.weight")  # [T, E]
            log.add(f"ffn_out-{L}", "mul_mat", _act(f_out))
            x = f_out + f_in
            log.add(f"l_out-{L}", "add", _act(x))

        x = x[-1:]
        n = self.rms(x)
        log.add("norm", "rms_norm", _act(n))
        h = n * self.W("output_norm.weight")
        log.add("result_norm", "mul", _act(h))
        logits = self.matmul(h, "output.weight")  # [1, vocab]
        log.add("result_output", "mul_mat", _act(logits))

        self.n_past += T
        return log.named()


def run(gguf_path, golden_path, dtype: str = "f32", bug: str | None = None, model: Model | None = None,
        whole_rows: bool = False) -> dict[str, np.ndarray]:
    """Runs the golden's prompt and teacher-forced decode steps; returns every tap the golden holds
    (`s{k}/{tap}`, golden shapes, float32), `s{k}/result_output` for every step, and `tokens` (int32).
    `model` lets a caller reuse an already loaded Model of `gguf_path`. A row-subset tap (the long
    goldens) is cut to the golden's rows, or with `whole_rows` dumped whole (every row of the step), as an
    engine that knows nothing of row subsets would: `lockstep compare` cuts it."""
    spec = read_golden(golden_path)
    m = model if model is not None else Model(gguf_path)
    eng = Engine(m, dtype=dtype, bug=bug)
    n_ctx = len(spec.tokens) + spec.n_steps + 2
    eng.alloc_cache(n_ctx)
    vocab = m.w("output.weight").shape[0]
    if spec.tokens.size and (spec.tokens.max() >= vocab or spec.tokens.min() < 0):
        raise EngineError(f"{golden_path}: token id out of the model's vocabulary ({vocab})")
    out: dict[str, np.ndarray] = {"tokens": spec.tokens.astype(np.int32)}
    for k in range(spec.n_steps):
        ids = spec.tokens if k == 0 else spec.continuation[k - 1 : k]
        # llama.cpp names the golden holds at this step (a key is `name[.op[.k]]`), and the logits
        names = {key.split("/", 1)[1].split(".", 1)[0] for key in spec.shapes if key.startswith(f"s{k}/")}
        taps = eng.step(ids, want=lambda n, names=names: n in names or n == "result_output")
        for name, value in taps.items():
            key = f"s{k}/{name}"
            if key in spec.rows and not whole_rows:  # a row-subset tap: the rows the golden keeps
                value = np.take(value, spec.rows[key], axis=token_axis(key, value.shape))
            if key in spec.shapes or name == "result_output":
                out[key] = np.ascontiguousarray(value, dtype=np.float32)
    missing = [k for k in spec.shapes if k not in out]
    if missing:
        raise EngineError(f"{golden_path}: this engine produced no {missing[:5]} ({len(missing)} keys)")
    def fits(k: str) -> bool:
        if out[k].shape == spec.shapes[k]:
            return True
        if not (whole_rows and k in spec.rows):
            return False
        ax = token_axis(k, spec.shapes[k])
        whole = list(spec.shapes[k])
        whole[ax] = len(spec.tokens) if k.startswith("s0/") else 1
        return list(out[k].shape) == whole
    bad = [(k, out[k].shape, spec.shapes[k]) for k in spec.shapes if not fits(k)]
    if bad:
        raise EngineError(f"{golden_path}: shape mismatch (key, ours, golden): {bad[:5]}")
    return out


def save_dump(taps: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """f32 safetensors (tokens i32), written to a temp file then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in taps.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", help="model file (qwen2, llama or gemma3)")
    ap.add_argument("--golden", help="golden taps file (golden/taps/{model}/{tier}/{prompt}.safetensors)")
    ap.add_argument("--out", help="dump to write (f32 safetensors)")
    ap.add_argument("--dtype", choices=("f32", "f64"), default="f32")
    ap.add_argument("--bug", choices=sorted(BUGS), default=None, help="plant a bug")
    ap.add_argument("--whole-rows", action="store_true",
                    help="dump a long golden's row-subset taps whole (lockstep compare cuts them)")
    ap.add_argument("--list-bugs", action="store_true", help="print the planted bugs and where they should show")
    a = ap.parse_args(argv)
    if a.list_bugs:
        for b in BUGS.values():
            taps = {expected_localization(b.name, a).tap for a in b.archs}
            tap = b.tap if len(taps) == 1 else f"{b.tap} (llama: {expected_localization(b.name, 'llama').tap})"
            print(f"{b.name:24} s{b.step} layer {b.layer} {tap:20} {b.class_id:24} {b.what}")
        return 0
    if not (a.gguf and a.golden and a.out):
        ap.error("--gguf, --golden and --out are required")
    try:
        taps = run(a.gguf, a.golden, dtype=a.dtype, bug=a.bug, whole_rows=a.whole_rows)
        save_dump(taps, a.out)
    except EngineError as e:
        print(f"numpy_engine: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}: {len(taps)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
