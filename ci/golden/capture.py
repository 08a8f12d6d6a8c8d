"""Runs llama.cpp (through llama-cpp-python's low-level API) and records every graph tensor.

llama.cpp's scheduler calls `cb_eval(tensor, ask, user_data)` for each graph node: once with ask=true
("do you want this one?") and, if we said yes, again with ask=false once it is computed. We say yes to
every node that computes something (not the pure view ops, not the KV-cache writes, not unnamed nodes)
and copy its data out while it is valid. Naming rules: golden/README.md.
"""
from __future__ import annotations

import ctypes
import re
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import llama_cpp as L

_libbase = ctypes.CDLL(L.__path__[0] + "/lib/libggml-base.so")
_libbase.ggml_op_desc.restype = ctypes.c_char_p
_libbase.ggml_op_desc.argtypes = [ctypes.c_void_p]



def tokenize(vocab, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
    """llama.cpp's tokenizer on `text` (special tokens parsed when asked, BOS as the model says)."""
    data = text.encode("utf-8")
    buf = (L.llama_token * (len(data) + 16))()
    n = L.llama_tokenize(vocab, data, len(data), buf, len(buf), add_special, parse_special)
    if n < 0:
        raise RuntimeError(f"tokenize failed ({n})")
    return list(buf[:n])

class GgmlTensor(ctypes.Structure):
    """struct ggml_tensor of the vendored ggml (ggml/include/ggml.h: GGML_MAX_DIMS 4, GGML_MAX_SRC 10,
    GGML_MAX_OP_PARAMS 64, GGML_MAX_NAME 64)."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


SKIPPED_OPS = {"NONE", "RESHAPE", "VIEW", "PERMUTE", "TRANSPOSE", "SET_ROWS", "CPY"}
_LAYER = re.compile(r"^(.*)-(\d+)$")
GGML_F32, GGML_F16 = 0, 1
GGML_LOG_LEVEL_ERROR = 4


@L.llama_log_callback
def _quiet_log(level, text, _ud):
    """llama.cpp's loader logs every tensor; keep only errors."""
    if level == GGML_LOG_LEVEL_ERROR:
        sys.stderr.write(text.decode(errors="replace"))


L.llama_log_set(_quiet_log, None)


def split_layer(name: str) -> tuple[str, int | None]:
    m = _LAYER.match(name)
    return (m.group(1), int(m.group(2))) if m else (name, None)


def wanted(name: str, op: str) -> bool:
    if op in SKIPPED_OPS or not name or name.startswith(("node_", "leaf_", "cache_")) or " (" in name:
        return False
    return True


@dataclass
class Node:
    name: str          # llama.cpp's callback name, e.g. "Qcur-0"
    op: str            # ggml op, e.g. "ROPE"
    array: np.ndarray  # f32, shape [ne3, ne2, ne1, ne0]


@dataclass
class Tap:
    key: str           # unique within its step, e.g. "Qcur-0.rope"
    name: str
    op: str
    layer: int | None
    array: np.ndarray


def assign_keys(nodes: list[Node]) -> list[Tap]:
    """Names repeated within a step get `.{op}`; a repeated (name, op) pair gets `.{op}.{k}`."""
    by_name: dict[str, int] = {}
    by_pair: dict[tuple[str, str], int] = {}
    for n in nodes:
        by_name[n.name] = by_name.get(n.name, 0) + 1
        by_pair[(n.name, n.op)] = by_pair.get((n.name, n.op), 0) + 1
    seen: dict[tuple[str, str], int] = {}
    taps = []
    for n in nodes:
        op = n.op.lower()
        key = n.name
        if by_name[n.name] > 1:
            key += "." + op
            if by_pair[(n.name, n.op)] > 1:
                k = seen.get((n.name, n.op), 0)
                seen[(n.name, n.op)] = k + 1
                key += f".{k}"
        taps.append(Tap(key, n.name, n.op, split_layer(n.name)[1], n.array))
    return taps


def copy_tensor(t: GgmlTensor) -> np.ndarray:
    """The tensor's data as a fresh f32 array [ne3, ne2, ne1, ne0], honouring its strides."""
    if t.type == GGML_F32:
        dtype, size = np.float32, 4
    elif t.type == GGML_F16:
        dtype, size = np.float16, 2
    else:
        raise ValueError(f"tensor {t.name!r} has ggml type {t.type}, expected F32 or F16")
    ne = [int(x) for x in t.ne]
    nb = [int(x) for x in t.nb]
    span = sum((ne[i] - 1) * nb[i] for i in range(4)) + size
    raw = np.frombuffer((ctypes.c_uint8 * span).from_address(t.data), dtype=np.uint8)
    # [ne3, ne2, ne1, ne0, element bytes], then made contiguous and reinterpreted as dtype
    view = np.lib.stride_tricks.as_strided(raw, shape=(ne[3], ne[2], ne[1], ne[0], size),
                                           strides=(nb[3], nb[2], nb[1], nb[0], 1))
    return np.ascontiguousarray(view).view(dtype).reshape(ne[3], ne[2], ne[1], ne[0]).astype(np.float32)


@dataclass
class Run:
    tokens: list[int]
    steps: list[list[Tap]]            # steps[0] = prefill, steps[k] = decode step k
    continuation: list[int]           # greedy token chosen from each step's logits
    topk_ids: np.ndarray              # [n_continue, TOPK] i32
    topk_values: np.ndarray           # [n_continue, TOPK] f32
    lse: np.ndarray                   # [n_continue] f32, log-sum-exp of each step's logits (f64 math)
    first_eog: int | None = None      # index into continuation of the first end-of-generation token


TOPK = 64


class LlamaCpp:
    """One model loaded in llama.cpp (CPU), ready to run prompts with every tensor recorded."""

    def __init__(self, model_path: str, tier: str, threads: int, n_ctx: int = 512):
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_mmap = True
        self.model = L.llama_model_load_from_file(model_path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.tier, self.threads, self.n_ctx = tier, threads, n_ctx
        self._nodes: list[Node] = []
        self._capturing = False
        # Which llama.cpp names to copy out (None: all). Chosen by name, not by tap key, so that the
        # keys of the kept nodes (`.{op}` suffixes count the nodes of one name) do not change.
        self._select: Callable[[str], bool] | None = None

        @L.ggml_backend_sched_eval_callback
        def cb(tp, ask, _ud):
            if not self._capturing:
                return False
            t = ctypes.cast(tp, ctypes.POINTER(GgmlTensor)).contents
            name = t.name.decode()
            op = _libbase.ggml_op_desc(tp).decode()
            if ask:
                return wanted(name, op) and (self._select is None or self._select(name))
            if wanted(name, op) and (self._select is None or self._select(name)):
                self._nodes.append(Node(name, op, copy_tensor(t)))
            return True

        self._cb = cb  # keep the ctypes callback alive

    def new_context(self):
        cp = L.llama_context_default_params()
        cp.n_ctx = self.n_ctx
        cp.n_batch = self.n_ctx
        cp.n_ubatch = self.n_ctx        # the whole prompt in one graph: one prefill step
        cp.n_threads = self.threads
        cp.n_threads_batch = self.threads
        cp.flash_attn_type = 0          # disabled: kq and kq_soft_max exist as tensors
        cp.no_perf = True
        if self.tier == "exact":
            cp.type_k = GGML_F32
            cp.type_v = GGML_F32
        cp.cb_eval = self._cb
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise RuntimeError("llama_init_from_model failed")
        return ctx

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return tokenize(self.vocab, text, add_special, parse_special)

    def is_eog(self, tok: int) -> bool:
        return bool(L.llama_vocab_is_eog(self.vocab, tok))

    def _decode(self, ctx, tokens: list[int], n_past: int, capture: bool) -> tuple[list[Tap], np.ndarray]:
        arr = (L.llama_token * len(tokens))(*tokens)
        self._nodes = []
        self._capturing = capture
        rc = L.llama_decode(ctx, L.llama_batch_get_one(arr, len(tokens)))
        self._capturing = False
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(self.n_vocab,)).astype(np.float32)
        kv_len = n_past + len(tokens)
        nodes = []
        for n in self._nodes:
            if split_layer(n.name)[0] in ("kq", "kq_soft_max"):
                n = Node(n.name, n.op, np.ascontiguousarray(n.array[..., :kv_len]))
            nodes.append(n)
        self._nodes = []
        return assign_keys(nodes), logits

    def run(self, tokens: list[int], tapped_steps: int, n_continue: int,
            progress: Callable[[int, int], None] | None = None,
            select: Callable[[int, str], bool] | None = None) -> Run:
        """Prefill `tokens` (step 0), then greedy decode; taps for steps 0..tapped_steps.
        `progress(done, n_continue)` is called after each step. `select(step, name)`: whether to copy
        the nodes of that llama.cpp name at that step (None: every node); a long prefill's every tap
        would not fit in memory (qwen: ~110 MB per layer at 1,024 tokens, kq and kq_soft_max aside)."""
        if len(tokens) + n_continue > self.n_ctx:
            raise ValueError(f"{len(tokens)} prompt tokens + {n_continue} steps exceed the context of "
                             f"{self.n_ctx}; open the model with a larger n_ctx")
        ctx = self.new_context()
        try:
            steps, cont, ids, vals, lses = [], [], [], [], []
            n_past = 0
            feed = tokens
            for k in range(n_continue):
                self._select = None if select is None else (lambda name, k=k: select(k, name))
                taps, logits = self._decode(ctx, feed, n_past, capture=k <= tapped_steps)
                n_past += len(feed)
                if k <= tapped_steps:
                    steps.append(taps)
                order = np.argsort(-logits, kind="stable")[:TOPK]
                ids.append(order.astype(np.int32))
                vals.append(logits[order])
                l64 = logits.astype(np.float64)
                m = l64.max()
                lses.append(np.float32(m + np.log(np.exp(l64 - m).sum())))
                nxt = int(np.argmax(logits))   # first maximum, as greedy sampling takes it
                cont.append(nxt)
                feed = [nxt]
                if progress is not None:
                    progress(k + 1, n_continue)
            first_eog = next((i for i, t in enumerate(cont) if self.is_eog(t)), None)
            return Run(tokens, steps, cont, np.stack(ids), np.stack(vals), np.array(lses, dtype=np.float32),
                       first_eog)
        finally:
            self._select = None
            L.llama_free(ctx)

    def close(self):
        L.llama_model_free(self.model)


class Vocab:
    """A model's vocabulary and metadata as llama.cpp loads them with vocab_only (no weights): a second
    or less, where gguf's GGUFReader parses every field (18 s for gemma3's 262k-token vocabulary on a
    loaded 2-core machine)."""

    def __init__(self, model_path: str):
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.vocab_only = True
        self.path = model_path
        self.model = L.llama_model_load_from_file(model_path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load the vocabulary of {model_path}")
        self.vocab = L.llama_model_get_vocab(self.model)

    def meta(self, key: str) -> str | None:
        """A metadata value as text, None when the file lacks the key."""
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = L.llama_model_meta_val_str(self.model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def token_text(self, tid: int) -> str:
        """A token's text as stored in the vocabulary ('' for an id outside it)."""
        if not 0 <= tid < L.llama_vocab_n_tokens(self.vocab):
            return ""
        return L.llama_vocab_get_text(self.vocab, tid).decode("utf-8", errors="replace")

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """As `LlamaCpp.tokenize`."""
        return tokenize(self.vocab, text, add_special, parse_special)

    def close(self):
        L.llama_model_free(self.model)
