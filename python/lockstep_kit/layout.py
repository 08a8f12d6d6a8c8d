"""Fitting a recorded array to the golden's shape, and hints for the usual layout mistakes.

Only one mismatch is fixed silently: leading size-1 axes (an engine's ``[T, W]`` for the golden's
``[1, 1, T, W]``). Anything else may be a real bug in the engine (transposed scores, a padded KV view,
a last layer that kept every row), so it is an error with a hint rather than a silent fix.
"""

from __future__ import annotations

import re

_LAYER = re.compile(r"-(\d+)(?:\.|$)")
# Taps that llama.cpp computes in [1, heads, tokens, X] (heads-first).
_HEADS_FIRST = re.compile(r"^(kq|kq_soft_max|kqv)-\d+")
# Taps that are [1, tokens, heads, head_dim] (tokens-first).
_TOKENS_FIRST = re.compile(r"^[QK]cur-\d+\.rope")
# From here on in the last layer, llama.cpp keeps only the last token's row.
_LAST_ROW = re.compile(r"^(ffn_inp|ffn_norm|norm-\d+\.rms_norm\.1|ffn_gate|ffn_up|ffn_swiglu|ffn_out|l_out)")
_ALWAYS_LAST_ROW = ("norm", "result_norm", "result_output")


def token_axis(tap: str, shape) -> int:
    """The token axis of a 4-D tap, as lockstep's (src/checks/taps.rs ``token_axis``): 1 for
    ``[1, tokens, heads, head_dim]`` (after RoPE), else 2 (``[1, 1, tokens, width]``, ``[1, heads, tokens, kv]``)."""
    name, _, stage = tap.partition(".")
    fam = re.sub(r"-\d+$", "", name)
    rope_like = stage == "rope" or (fam in ("Qcur", "Kcur", "Vcur") and not stage and len(shape) == 4 and shape[1] != 1)
    return 1 if rope_like else 2


def layer_of(tap: str):
    """"Qcur-12.rope" -> 12; "result_norm" -> None."""
    m = _LAYER.search(tap)
    return int(m.group(1)) if m else None


def keeps_last_row_only(tap: str, n_layers) -> bool:
    """Whether llama.cpp keeps only the last token's row of this tap (last layer after attention,
    the final norm and the logits); n_layers None: only the taps after the last layer."""
    if tap in _ALWAYS_LAST_ROW:
        return True
    return bool(_LAST_ROW.match(tap)) and n_layers is not None and layer_of(tap) == n_layers - 1


def strip_leading_ones(shape) -> tuple:
    shape = tuple(shape)
    i = 0
    while i < len(shape) and shape[i] == 1:
        i += 1
    return shape[i:]


def as_4d(shape) -> tuple:
    """Pad with leading 1s to rank 4 (shapes of higher rank are returned unchanged)."""
    shape = tuple(shape)
    return (1,) * (4 - len(shape)) + shape if len(shape) < 4 else shape


def fits_by_squeeze(found, expected) -> bool:
    """True when the two shapes differ only by leading size-1 axes."""
    return strip_leading_ones(found) == strip_leading_ones(expected)


def hint(tap: str, step: int, found, expected, n_layers=None) -> str:
    """Why ``found`` is probably not ``expected`` for this tap, and what to do; "" when no idea."""
    f4, e4 = as_4d(found), as_4d(expected)
    if len(f4) != 4:
        return f"taps have at most 4 dimensions ([ne3, ne2, ne1, ne0]); this has {len(found)}."
    # The last layer / output head after attention: 1 row in the golden, T rows found.
    if e4[:2] == f4[:2] and e4[3] == f4[3] and e4[2] == 1 and f4[2] > 1 and keeps_last_row_only(tap, n_layers):
        where = (
            f"in the last layer (layer {layer_of(tap)}) from ffn_inp on"
            if layer_of(tap) is not None
            else f"in {tap}"
        )
        return (
            f"llama.cpp keeps only the last token's row {where} (it drops the other rows after "
            f"attention, as only the last token's logits are needed): record x[..., -1:, :]."
        )
    if _HEADS_FIRST.match(tap) and (f4[0], f4[2], f4[1], f4[3]) == e4 and f4 != e4:
        return (
            f"tokens-first: llama.cpp's {tap.split('-')[0]} is heads-first [1, heads, tokens, "
            f"{'head_dim' if tap.startswith('kqv-') else 'kv_len'}]; transpose the middle axes "
            f"(numpy: x.transpose(0, 2, 1, 3), torch: x.permute(0, 2, 1, 3))."
        )
    if _TOKENS_FIRST.match(tap) and (f4[0], f4[2], f4[1], f4[3]) == e4 and f4 != e4:
        return (
            f"heads-first: llama.cpp's {tap} is tokens-first [1, tokens, heads, head_dim]; transpose "
            f"the middle axes (numpy: x.transpose(0, 2, 1, 3), torch: x.permute(0, 2, 1, 3))."
        )
    if _HEADS_FIRST.match(tap) and not tap.startswith("kqv-") and f4[:3] == e4[:3] and f4[3] != e4[3]:
        if f4[3] > e4[3]:
            return (
                f"kv_len is trimmed to the positions in use ({e4[3]} = cached positions + this "
                f"step's tokens); a padded cache view is not part of the tap: record x[..., :{e4[3]}]."
            )
        return (
            f"kv_len must count every cached position plus this step's tokens ({e4[3]} at step "
            f"{step}); {f4[3]} looks like a KV cache that lost positions or a decode step that "
            f"does not attend to the cache."
        )
    if sorted(f4) == sorted(e4):
        perm = _axis_permutation(f4, e4)
        how = f"numpy: x.transpose{perm}" if perm else "the axes are in another order"
        return f"same sizes in another order: transposed axes? ({how}; golden layout: {_layout(tap)})."
    if _numel(f4) == _numel(e4):
        return (
            f"same element count: if it is the same data in row-major order, reshape it to "
            f"{list(expected)} (golden layout: {_layout(tap)})."
        )
    if f4[3] == e4[3] and f4[2] != e4[2]:
        return (
            f"the golden has {e4[2]} row(s) (tokens) here: step 0 is the prefill of every prompt "
            f"token, each later step one token (teacher-forced: continuation[k-1])."
        )
    if f4[2] == e4[2] and f4[3] != e4[3]:
        return f"width {f4[3]} instead of {e4[3]}: a different tensor, or a wrong head count / head_dim?"
    return ""


def _layout(tap: str) -> str:
    if _HEADS_FIRST.match(tap):
        return "[1, heads, tokens, kv_len]" if not tap.startswith("kqv-") else "[1, heads, tokens, head_dim]"
    if _TOKENS_FIRST.match(tap):
        return "[1, tokens, heads, head_dim]"
    return "[1, 1, tokens, width]"


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _axis_permutation(found, expected):
    """The axes order p with found[p[i]] == expected[i], when it is unique; else None."""
    perm, used = [], set()
    for size in expected:
        candidates = [i for i, d in enumerate(found) if d == size and i not in used]
        if len(candidates) != 1 and expected.count(size) == 1:
            return None
        perm.append(candidates[0])
        used.add(candidates[0])
    # Repeated sizes (e.g. two 1s) make the choice ambiguous only if they are not all 1s.
    if any(expected.count(s) > 1 and s != 1 for s in expected):
        return None
    return tuple(perm)
