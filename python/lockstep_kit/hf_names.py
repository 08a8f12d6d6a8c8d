"""Hugging Face transformers module names (qwen2, llama) -> llama.cpp tap names.

Each entry says which module, whether the tap is that module's input or output, and the tap. Checked
against the golden files' keys by tests/test_hf_names.py. What has no hook of its own:

- computed from hooks: ``norm-{L}.rms_norm.0`` / ``.1`` and ``norm`` (RMSNorm before its weight: the
  layernorm's input times rsqrt(mean(x^2) + eps)), and for qwen2 ``Qcur/Kcur/Vcur-{L}.mul_mat`` (the
  projection without its bias: F.linear(input, weight));
- from the attention function (see hf.py): ``Qcur/Kcur-{L}.rope``, ``kq-{L}`` (unscaled, unmasked
  q·k), ``kq_soft_max-{L}`` (masked softmax, masked entries 0), ``kqv-{L}``;
- no tap at all: qwen2's ``o_proj`` output (llama.cpp leaves it unnamed) and ``mlp.act_fn``'s output
  (silu(gate) alone: llama.cpp fuses SiLU and the product with up into ``ffn_swiglu``).

llama only: llama.cpp's converter permutes the rows of Q and K so that RoPE rotates adjacent pairs
(0,1), (2,3), ...; transformers rotates (i, i + head_dim/2). Q/K taps from a transformers llama must be
put into llama.cpp's order per head: :func:`hf_to_llamacpp_qk_order`. qwen2 (NEOX RoPE) needs nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ARCHS = ("qwen2", "llama")


@dataclass(frozen=True)
class Hook:
    """A tap read from a module's input (first positional argument) or output. ``{L}``: layer."""

    module: str
    io: str  # "input" | "output"
    tap: str


def hooks(arch: str) -> list:
    """The module hooks of an architecture, in graph order."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    qwen2 = arch == "qwen2"
    layer = "model.layers.{L}"
    q, k, v = ("Qcur-{L}.add", "Kcur-{L}.add", "Vcur-{L}.add") if qwen2 else ("Qcur-{L}.mul_mat", "Kcur-{L}.mul_mat", "Vcur-{L}")
    out = [
        Hook("model.embed_tokens", "output", "embd"),
        Hook(f"{layer}.input_layernorm", "output", "attn_norm-{L}"),
        Hook(f"{layer}.self_attn.q_proj", "output", q),
        Hook(f"{layer}.self_attn.k_proj", "output", k),
        Hook(f"{layer}.self_attn.v_proj", "output", v),
        Hook(f"{layer}.self_attn.o_proj", "input", "kqv_out-{L}"),
    ]
    if not qwen2:
        out.append(Hook(f"{layer}.self_attn.o_proj", "output", "attn_out-{L}"))
    out += [
        # The residual sum after attention is the input of the FFN's norm.
        Hook(f"{layer}.post_attention_layernorm", "input", "ffn_inp-{L}"),
        Hook(f"{layer}.post_attention_layernorm", "output", "ffn_norm-{L}"),
        Hook(f"{layer}.mlp.gate_proj", "output", "ffn_gate-{L}"),
        Hook(f"{layer}.mlp.up_proj", "output", "ffn_up-{L}"),
        # silu(gate) * up is what down_proj gets.
        Hook(f"{layer}.mlp.down_proj", "input", "ffn_swiglu-{L}"),
        Hook(f"{layer}.mlp.down_proj", "output", "ffn_out-{L}"),
        Hook(layer, "output", "l_out-{L}"),
        Hook("model.norm", "output", "result_norm"),
        Hook("lm_head", "output", "result_output"),
    ]
    return out


# Taps that need more than one hook, by architecture (see the module doc for how each is computed).
def computed_taps(arch: str) -> list:
    taps = ["norm-{L}.rms_norm.0", "norm-{L}.rms_norm.1", "norm"]
    if arch == "qwen2":
        taps += ["Qcur-{L}.mul_mat", "Kcur-{L}.mul_mat", "Vcur-{L}.mul_mat"]
    return taps


ATTENTION_TAPS = ["Qcur-{L}.rope", "Kcur-{L}.rope", "kq-{L}", "kq_soft_max-{L}", "kqv-{L}"]

NO_TAP = {
    "self_attn.o_proj output (qwen2)": "llama.cpp's qwen2 graph leaves the attention output projection unnamed",
    "mlp.act_fn output": "silu(gate) alone: llama.cpp fuses SiLU and the product with up into ffn_swiglu",
    "model.rotary_emb": "cos/sin tables: llama.cpp computes RoPE inside the rope op",
}


def to_tap(module: str, arch: str, io: str = "output"):
    """The tap of ``module``'s ``io`` ("model.layers.3.mlp.up_proj" -> "ffn_up-3"), or None."""
    module = _strip_prefix(module)
    for h in hooks(arch):
        m = re.fullmatch(re.escape(h.module).replace(r"\{L\}", r"(\d+)"), module)
        if m and h.io == io:
            return h.tap.replace("{L}", m.group(1)) if m.groups() else h.tap
    return None


def hf_to_llamacpp_qk_order(x, head_dim: int):
    """Put a transformers llama Q or K tensor (last axis = heads * head_dim, or head_dim) into
    llama.cpp's per-head order: llama.cpp index 2j + s holds transformers index s * head_dim/2 + j.

    Works on numpy arrays and torch tensors; the last axis is permuted, the others kept.
    """
    shape = tuple(x.shape)
    half = head_dim // 2
    y = x.reshape(*shape[:-1], shape[-1] // head_dim, 2, half)  # [..., heads, s, j]
    y = y.swapaxes(-1, -2)  # [..., heads, j, s]
    return y.reshape(shape)


def suggest(name: str):
    """For a string that looks like a transformers module name: what to record instead, else None."""
    base = _strip_prefix(name)
    if not re.match(r"^(model\.|lm_head)", base):
        return None
    found = []
    for arch in ARCHS:
        for io in ("output", "input"):
            tap = to_tap(base, arch, io)
            if tap:
                found.append(f"its {io} is {tap} ({arch})")
    if found:
        return "; ".join(dict.fromkeys(found)) + " (lockstep_kit.hf_names.to_tap)"
    if base.endswith("o_proj"):
        return "its input is kqv_out-L; its output is attn_out-L for llama and has no tap for qwen2"
    if base.endswith("act_fn"):
        return "no tap: " + NO_TAP["mlp.act_fn output"] + " (record down_proj's input as ffn_swiglu-L)"
    return "no direct tap; see lockstep_kit.hf_names.hooks()"


def _strip_prefix(name: str) -> str:
    # "s0/model.layers.0..." or a wrapper's "base_model.model." prefix.
    name = name.split("/", 1)[-1]
    for p in ("base_model.model.", "module."):
        if name.startswith(p):
            name = name[len(p):]
    return name
