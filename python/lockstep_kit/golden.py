"""What a golden taps file holds, read from its safetensors header alone (no tensor data is loaded).

A safetensors file starts with an 8-byte little-endian header length, then that many bytes of JSON:
``{key: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``. The safetensors package has no
public call that returns the header without opening the whole file through its own reader, and we
want a specific error naming the file for every way a header can be bad, so the ~20 lines are here.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field

from . import layout
from .errors import KitError

# A header larger than this is not a taps file (qwen's largest golden header is ~70 KB).
_MAX_HEADER = 64 << 20

_STEP_KEY = re.compile(r"^s(\d+)/(.+)$")
ROWS_PREFIX = "rows/"  # rows/s0/l_out-0: the positions the row-subset tap s0/l_out-0 keeps


@dataclass(frozen=True)
class Entry:
    """One tensor of the golden: its safetensors dtype (``F32``, ``F16``, ``I32``) and shape."""

    dtype: str
    shape: tuple


@dataclass
class Golden:
    """The keys and shapes of a golden taps file (``golden/taps/{model}/{tier}/{prompt}.safetensors``)."""

    path: str
    entries: dict  # key -> Entry, e.g. "s0/Qcur-0.rope" -> Entry("F32", (1, 9, 4, 64))
    metadata: dict = field(default_factory=dict)
    _rows: dict = field(default=None, repr=False)  # "s0/l_out-0" -> (0, 1, 63, ...), read on first use

    @classmethod
    def open(cls, path) -> "Golden":
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) != 8:
                    raise KitError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
                (n,) = struct.unpack("<Q", raw_len)
                if n == 0 or n > _MAX_HEADER:
                    raise KitError(f"{path}: not a safetensors file (header length {n} bytes)")
                raw = f.read(n)
        except OSError as e:
            raise KitError(f"{path}: cannot read the golden: {e.strerror or e}") from e
        if len(raw) != n:
            raise KitError(f"{path}: truncated safetensors header ({len(raw)} of {n} bytes)")
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise KitError(f"{path}: safetensors header is not JSON: {e}") from e
        if not isinstance(header, dict):
            raise KitError(f"{path}: safetensors header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        entries = {}
        for key, v in header.items():
            try:
                entries[key] = Entry(str(v["dtype"]), tuple(int(d) for d in v["shape"]))
            except (TypeError, KeyError, ValueError) as e:
                raise KitError(f"{path}: header entry {key!r} has no valid dtype/shape") from e
        return cls(path, entries, metadata)

    def steps(self) -> list:
        """The steps the golden holds, e.g. [0, 1, 2, 3, 4]."""
        return sorted({int(m.group(1)) for k in self.entries if (m := _STEP_KEY.match(k))})

    def taps(self) -> list:
        """Every tap name of any step, e.g. ["Kcur-0.add", ..., "result_output"] (sorted)."""
        return sorted({m.group(2) for k in self.entries if (m := _STEP_KEY.match(k))})

    def vocab(self):
        """The vocabulary size (last dim of the prefill's ``result_output``), or None."""
        e = self.entries.get("s0/result_output")
        return e.shape[-1] if e else None

    def expected(self, step: int, tap: str):
        """The Entry a dump's ``s{step}/{tap}`` must match, or None when the golden has no such key.

        Real-model goldens keep only the top 64 logits of decode steps (``topk_values``), so they
        have no ``s{k}/result_output`` for k >= 1; a dump still records the full logits there (the
        comparison needs them), with the prefill's shape ``[1, 1, 1, vocab]``.
        """
        e = self.entries.get(f"s{step}/{tap}")
        if e is None and tap == "result_output" and step in self.steps() and self.vocab():
            e = Entry("F32", (1, 1, 1, self.vocab()))
        return e

    def rows(self, key: str):
        """The positions a row-subset tap keeps (golden/README.md, "Row-subset taps": the long goldens
        keep some token rows of a long prefill's taps, listed by the i32 tensor ``rows/{key}``), as a
        tuple in ascending order; None for a whole tap."""
        if self._rows is None:
            keys = [k for k in self.entries if k.startswith(ROWS_PREFIX)]
            self._rows = {}
            if keys:
                from safetensors import safe_open

                with safe_open(self.path, framework="numpy") as f:
                    for k in keys:
                        pos = tuple(int(p) for p in f.get_tensor(k).reshape(-1))
                        tap = k[len(ROWS_PREFIX):]
                        want = self.entries.get(tap)
                        m = _STEP_KEY.match(tap)
                        if want is None or not m or len(want.shape) != 4:
                            raise KitError(f"{self.path}: {k} lists rows of {tap}, which is not a 4-D tap of the golden")
                        n = want.shape[layout.token_axis(m.group(2), want.shape)]
                        if len(pos) != n or any(b <= a for a, b in zip(pos, pos[1:])) or (pos and pos[0] < 0):
                            raise KitError(f"{self.path}: {k}: expected {n} ascending non-negative positions "
                                           f"(the rows of {tap} {list(want.shape)}), found {list(pos)[:8]}")
                        self._rows[tap] = pos
        return self._rows.get(key)

    def step_rows(self, step: int):
        """Rows (tokens) of a whole tap at ``step``: the prompt's length at the prefill, 1 after."""
        if step > 0:
            return 1
        e = self.entries.get("tokens")
        return e.shape[0] if e else None

    def step_keys(self) -> list:
        """Every ``s{k}/{tap}`` a complete dump holds (incl. implied decode-step logits), natural order."""
        keys = [k for k in self.entries if _STEP_KEY.match(k)]
        for s in self.steps():
            if f"s{s}/result_output" not in self.entries and self.vocab():
                keys.append(f"s{s}/result_output")
        return sorted(set(keys), key=natural_key)


def natural_key(key: str):
    """Sort key putting s2 before s10 and layer 2 before layer 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def split_key(key: str):
    """"s3/Qcur-0.rope" -> (3, "Qcur-0.rope"); a key without a step -> (None, key)."""
    m = _STEP_KEY.match(key)
    return (int(m.group(1)), m.group(2)) if m else (None, key)
