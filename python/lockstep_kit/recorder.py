"""Recorder: collects an engine's taps, checks each against the golden as it arrives, writes the dump.

    rec = Recorder(golden="golden/taps/tiny-qwen2/exact/fox.safetensors")
    rec.set_tokens(prompt_ids)
    rec.record(0, "embd", x)          # x: [T, W] or [1, 1, T, W], numpy or torch, any float dtype
                                       # (a row-subset tap of a long golden: whole, stored as its kept rows)
    rec.save("dump.safetensors")       # f32 safetensors, written atomically

Without a golden nothing is checked but the names' form (``s{step}/{tap}``) and the dtype.
"""

from __future__ import annotations

import difflib
import os
import re
import tempfile
import warnings as _warnings

import numpy as np

from . import hf_names, layout
from .errors import KitError
from .golden import Golden, natural_key, split_key

_TAP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


class Recorder:
    """Collects ``s{step}/{tap}`` tensors (stored f32) and the prompt's ``tokens``; see module doc."""

    def __init__(self, golden=None, strict: bool = True):
        self.golden = Golden.open(golden) if golden is not None else None
        self.strict = strict
        self.tensors = {}  # "s{step}/{tap}" -> np.ndarray float32, golden's shape
        self.tokens = None  # np.ndarray int32 [n]
        self.continuation = None  # np.ndarray int32 [n], the engine's own greedy tokens (optional)
        self.warnings = []  # what strict=False let through (also sent to warnings.warn)
        self._layers = _layer_count(self.golden) if self.golden else None

    # -- queries --------------------------------------------------------------------------------
    def wants(self, step: int, tap: str) -> bool:
        """True when there is no golden, else whether the golden holds ``s{step}/{tap}``."""
        if self.golden is None:
            return True
        return self.golden.expected(int(step), tap) is not None

    def positions(self, step: int, tap: str):
        """The token positions the golden keeps of ``s{step}/{tap}`` when it is a row-subset tap (the long
        goldens), as a tuple; None for a whole tap or without a golden. ``record`` takes the whole tap
        (and keeps these rows) or only these rows, in this order."""
        if self.golden is None:
            return None
        return self.golden.rows(f"s{int(step)}/{tap}")

    def missing(self) -> list:
        """Golden keys (``s{k}/{tap}``, incl. each decode step's logits) not recorded yet, in order."""
        if self.golden is None:
            return []
        return [k for k in self.golden.step_keys() if k not in self.tensors]

    def golden_tokens(self):
        """The golden's prompt token ids (``tokens``, int32 [n]) — feed these to judge the engine."""
        return self._golden_tensor("tokens")

    def golden_continuation(self):
        """The golden's greedy continuation (int32 [32]); decode step k is fed continuation[k-1]."""
        return self._golden_tensor("continuation")

    # -- recording ------------------------------------------------------------------------------
    def set_tokens(self, ids) -> None:
        """The prompt's token ids as the engine tokenized them (stored as ``tokens``, int32 [n])."""
        arr = _to_numpy(ids, "tokens")
        if arr.ndim != 1 and arr.size == max(arr.shape, default=0):
            arr = arr.reshape(-1)  # [1, n] -> [n]
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or _all_integral(arr)):
            raise KitError(f"tokens: expected a 1-D list of integer token ids, found {arr.dtype} {list(arr.shape)}")
        if arr.size == 0:
            raise KitError("tokens: empty token list")
        if arr.min() < 0 or arr.max() > np.iinfo(np.int32).max:
            raise KitError(f"tokens: ids must be in 0..2^31-1, found {arr.min()}..{arr.max()}")
        if self.golden is not None and "tokens" in self.golden.entries:
            n = self.golden.entries["tokens"].shape[0]
            if arr.size != n:
                self._problem(
                    f"tokens: the golden's prompt has {n} tokens, found {arr.size}: the tokenizer "
                    f"differs from llama.cpp's. To judge the rest of the engine, feed it the golden's "
                    f"ids (Recorder.golden_tokens()) and fix the tokenizer separately."
                )
        self.tokens = arr.astype(np.int32)

    def set_continuation(self, ids) -> None:
        """The engine's own greedy generation after the prompt (free-running, not teacher-forced),
        stored as ``continuation`` (int32 [n]); lockstep compare's diversity gate judges it."""
        arr = _to_numpy(ids, "continuation").reshape(-1)
        if arr.size == 0 or not (np.issubdtype(arr.dtype, np.integer) or _all_integral(arr)):
            raise KitError(f"continuation: expected a non-empty list of integer token ids, found {arr.dtype} {list(arr.shape)}")
        if arr.min() < 0 or arr.max() > np.iinfo(np.int32).max:
            raise KitError(f"continuation: ids must be in 0..2^31-1, found {arr.min()}..{arr.max()}")
        self.continuation = arr.astype(np.int32)

    def record(self, step: int, tap: str, array) -> None:
        """Store ``s{step}/{tap}``; with a golden, check the name and shape (KitError when they do not fit)."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise KitError(f"{tap}: step must be an integer >= 0 (0 = prefill), found {step!r}")
        step = int(step)
        if not isinstance(tap, str) or not _TAP_NAME.match(tap):
            raise KitError(f"tap name {tap!r}: expected a llama.cpp tap name such as 'attn_norm-0' (no '/', no step)")
        key = f"s{step}/{tap}"
        arr = _to_numpy(array, key)
        if not np.issubdtype(arr.dtype, np.floating):
            raise KitError(f"{key}: expected a float tensor (f32; f16/bf16/f64 are converted), found dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if key in self.tensors:
            self._problem(f"{key}: recorded twice (the second value replaces the first)")
        if self.golden is not None:
            arr = self._fit(step, tap, key, arr)
            if arr is None:
                return
        elif arr.ndim > 4:
            self._problem(f"{key}: taps have at most 4 dimensions, found shape {list(arr.shape)}")
        else:
            arr = arr.reshape(layout.as_4d(arr.shape))
        self.tensors[key] = arr

    def save(self, path) -> None:
        """Write every recorded tensor (f32) and ``tokens`` (i32) to ``path`` atomically."""
        from safetensors.numpy import save_file

        if not self.tensors:
            raise KitError(f"{path}: nothing recorded")
        if self.tokens is None:
            self._warn(
                f"{path}: no tokens (call set_tokens): lockstep compare will report the tokenizer as not checked"
            )
        path = os.fspath(path)
        tensors = dict(self.tensors)
        if self.tokens is not None:
            tensors["tokens"] = self.tokens
        if self.continuation is not None:
            tensors["continuation"] = self.continuation
        metadata = {"producer": "lockstep_kit"}
        if self.golden is not None:
            metadata["golden"] = os.path.basename(self.golden.path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    # -- internals ------------------------------------------------------------------------------
    def _fit(self, step, tap, key, arr):
        """The array in the golden's shape; raises (strict) or warns and returns it as found."""
        g = self.golden
        expected = g.expected(step, tap)
        if expected is None:
            self._problem(self._unknown(step, tap, key))
            return arr.reshape(layout.as_4d(arr.shape)) if arr.ndim <= 4 else arr
        want = expected.shape
        if tuple(arr.shape) == want:
            return arr
        if layout.fits_by_squeeze(arr.shape, want):
            return arr.reshape(want)
        positions = g.rows(key)
        if positions is not None:
            return self._cut_rows(step, tap, key, arr, want, positions)
        h = layout.hint(tap, step, arr.shape, want, self._layers)
        self._problem(
            f"{key}: expected shape {list(want)} ({expected.dtype} in the golden), found {list(arr.shape)} "
            f"{arr.dtype}" + (f": {h}" if h else "")
        )
        return arr

    def _cut_rows(self, step, tap, key, arr, want, positions):
        """A row-subset tap (golden/README.md, "Row-subset taps") recorded whole: the golden's rows of it,
        in the golden's shape. The kit stores the kept rows only (the dump stays as small as the golden:
        a whole kq of a 1,046-token prefill is 61 MB); lockstep compare would cut a whole tap the same way."""
        ax = layout.token_axis(tap, want)
        rows = self.golden.step_rows(step)
        whole = list(want)
        whole[ax] = rows if rows is not None else -1
        if rows is not None and layout.fits_by_squeeze(arr.shape, whole):
            return np.ascontiguousarray(np.take(arr.reshape(whole), list(positions), axis=ax))
        shown = ", ".join(map(str, positions)) if len(positions) <= 8 else (
            f"{', '.join(map(str, positions[:5]))}, … ({len(positions) - 6} more), {positions[-1]}")
        self._problem(
            f"{key}: the golden keeps the {len(positions)} rows at positions {shown} of this tap: expected "
            f"{list(want)} (those rows) or {whole} (the whole tap, which the kit cuts to those rows), found "
            f"{list(arr.shape)} {arr.dtype}: record the whole tap (token axis {ax}), or only those rows in "
            f"ascending order (Recorder.positions(step, tap) lists them)"
        )
        return arr

    def _unknown(self, step, tap, key) -> str:
        g = self.golden
        steps = g.steps()
        if tap in g.taps():
            return (
                f"{key}: the golden holds steps s{steps[0]}..s{steps[-1]} ({len(steps)} steps: the prefill and "
                f"{len(steps) - 1} teacher-forced decode steps); step {step} is not one of them"
            )
        mapped = hf_names.suggest(tap)
        if mapped:
            return f"{key}: {tap!r} is a Hugging Face module name, not a llama.cpp tap: {mapped}"
        known = g.taps()
        # "Qcur-0" -> "Qcur-0.add", "Qcur-0.mul_mat", ... first; then spelling neighbours.
        near = [t for t in known if t.startswith(tap + ".")]
        near += [t for t in difflib.get_close_matches(tap, known, n=3, cutoff=0.5) if t not in near]
        s = f"{key}: unknown tap {tap!r} (not in the golden {os.path.basename(g.path)})"
        lay = layout.layer_of(tap)
        if lay is not None and self._layers is not None and lay >= self._layers:
            s += f" (the model has layers 0..{self._layers - 1})"
        elif lay is not None:
            stem = re.sub(r"-\d+", "-{L}", tap)
            kept = sorted({layout.layer_of(t) for t in known if re.sub(r"-\d+", "-{L}", t) == stem})
            if kept:
                return (
                    f"{key}: the golden keeps {stem} only for layers {', '.join(map(str, kept))} (see "
                    f"golden/README.md, 'What is kept'); skip the others: check rec.wants(step, tap) first"
                )
        if near:
            s += "; nearest known: " + ", ".join(near[:5])
        return s

    def _problem(self, msg: str) -> None:
        if self.strict:
            raise KitError(msg)
        self._warn(msg)

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        _warnings.warn(msg, stacklevel=3)

    def _golden_tensor(self, key):
        if self.golden is None:
            raise KitError("no golden given to the Recorder")
        if key not in self.golden.entries:
            raise KitError(f"{self.golden.path}: no {key!r} key")
        from safetensors import safe_open

        with safe_open(self.golden.path, framework="numpy") as f:
            return f.get_tensor(key)


def _layer_count(golden: Golden):
    layers = [layout.layer_of(t) for t in golden.taps()]
    layers = [x for x in layers if x is not None]
    return max(layers) + 1 if layers else None


def _to_numpy(x, what) -> np.ndarray:
    """numpy arrays as they are; torch tensors detached, on the CPU, bf16/f16 widened to f32."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        t = x.detach().cpu()
        if t.is_floating_point():
            t = t.float()
        return t.numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise KitError(f"{what}: cannot convert {type(x).__name__} to an array: {e}") from e


def _all_integral(arr: np.ndarray) -> bool:
    return np.issubdtype(arr.dtype, np.floating) and bool(np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)))


__all__ = ["Recorder", "KitError", "natural_key", "split_key"]
