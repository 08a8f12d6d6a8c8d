"""The transformers -> llama.cpp name mapping, checked against the keys of the tiny goldens."""

import numpy as np
import pytest

from conftest import golden_taps
from lockstep_kit import hf_names
from lockstep_kit.golden import Golden

GOLDENS = {"qwen2": golden_taps("tiny-qwen2/exact/fox"), "llama": golden_taps("tiny-llama/exact/fox")}
LAYERS = 2


def expand(templates):
    out = set()
    for t in templates:
        out |= {t.replace("{L}", str(L)) for L in range(LAYERS)} if "{L}" in t else {t}
    return out


@pytest.mark.parametrize("arch", hf_names.ARCHS)
def test_mapping_covers_exactly_the_golden_taps(arch):
    golden = set(Golden.open(GOLDENS[arch]).taps())
    mapped = expand([h.tap for h in hf_names.hooks(arch)])
    computed = expand(hf_names.computed_taps(arch) + hf_names.ATTENTION_TAPS)
    assert not mapped & computed, "a tap is both hooked and computed"
    assert mapped | computed == golden, (
        f"not in the golden: {sorted((mapped | computed) - golden)}; unmapped: {sorted(golden - mapped - computed)}"
    )


def test_module_to_tap():
    assert hf_names.to_tap("model.layers.3.self_attn.q_proj", "qwen2") == "Qcur-3.add"
    assert hf_names.to_tap("model.layers.3.self_attn.q_proj", "llama") == "Qcur-3.mul_mat"
    assert hf_names.to_tap("model.layers.3.self_attn.v_proj", "llama") == "Vcur-3"
    assert hf_names.to_tap("model.layers.3.self_attn.o_proj", "qwen2", "input") == "kqv_out-3"
    assert hf_names.to_tap("model.layers.3.self_attn.o_proj", "qwen2") is None  # no tap in qwen2
    assert hf_names.to_tap("model.layers.3.self_attn.o_proj", "llama") == "attn_out-3"
    assert hf_names.to_tap("model.layers.11.mlp.down_proj", "llama", "input") == "ffn_swiglu-11"
    assert hf_names.to_tap("model.layers.11.post_attention_layernorm", "qwen2", "input") == "ffn_inp-11"
    assert hf_names.to_tap("model.layers.11", "qwen2") == "l_out-11"
    assert hf_names.to_tap("model.layers.0.mlp.act_fn", "qwen2") is None
    assert hf_names.to_tap("lm_head", "llama") == "result_output"
    assert hf_names.to_tap("model.norm", "qwen2") == "result_norm"
    assert hf_names.to_tap("base_model.model.model.embed_tokens", "qwen2") == "embd"
    with pytest.raises(ValueError, match="unknown architecture"):
        hf_names.hooks("gpt2")


def test_suggest():
    assert "ffn_up-2 (qwen2)" in hf_names.suggest("model.layers.2.mlp.up_proj")
    assert "no tap" in hf_names.suggest("model.layers.2.mlp.act_fn")
    assert hf_names.suggest("Qcur-0") is None


def test_qk_order_matches_llamacpp_converter():
    # convert_hf_to_gguf.py's LlamaModel.permute, applied to Q/K weight rows (n_head heads).
    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    heads, hd = 3, 8
    w = np.random.default_rng(1).standard_normal((heads * hd, 5))
    x = np.random.default_rng(2).standard_normal(5)
    hf_out = w @ x  # transformers' q_proj output
    llamacpp_out = permute(w, heads) @ x  # llama.cpp's Qcur.mul_mat
    np.testing.assert_allclose(hf_names.hf_to_llamacpp_qk_order(hf_out, hd), llamacpp_out)
    assert hf_names.hf_to_llamacpp_qk_order(np.arange(8), 8).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    # Also on [..., heads, head_dim] (the RoPE taps) and leading axes.
    y = np.arange(2 * 3 * 8).reshape(2, 3, 8)
    np.testing.assert_array_equal(
        hf_names.hf_to_llamacpp_qk_order(y, 8).reshape(2, 24), hf_names.hf_to_llamacpp_qk_order(y.reshape(2, 24), 8)
    )
