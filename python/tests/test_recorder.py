"""Recorder: names, shapes and their hints against real goldens; the atomic save round trip."""

import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import golden_taps, require_or_skip
from lockstep_kit import KitError, Recorder
from lockstep_kit.golden import Golden

QWEN = golden_taps("tiny-qwen2/exact/fox")  # 2 layers, 9 tokens, H=4, Hkv=2, hd=64, W=256, vocab 1024
LLAMA = golden_taps("tiny-llama/exact/fox")
REAL = golden_taps("qwen2.5-coder-0.5b/exact/code")  # decode steps keep only the top-64 logits
T = 9


def rec(strict=True, golden=QWEN):
    return Recorder(golden=golden, strict=strict)


def err(fn, *args) -> str:
    with pytest.raises(KitError) as e:
        fn(*args)
    return str(e.value)


def z(*shape, dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


def test_exact_shape_is_stored_f32():
    r = rec()
    r.record(0, "embd", z(1, 1, T, 256, dtype=np.float64))
    assert r.tensors["s0/embd"].dtype == np.float32 and r.tensors["s0/embd"].shape == (1, 1, T, 256)


def test_leading_ones_are_reshaped_silently():
    r = rec()
    r.record(0, "embd", z(T, 256))  # [T, W] for [1, 1, T, W]
    r.record(0, "kq-0", z(4, T, T))  # [H, T, kv] for [1, H, T, kv]
    r.record(1, "ffn_out-0", z(256))  # a decode step's one row
    assert r.tensors["s0/embd"].shape == (1, 1, T, 256)
    assert r.tensors["s0/kq-0"].shape == (1, 4, T, T)
    assert r.tensors["s1/ffn_out-0"].shape == (1, 1, 1, 256)
    assert r.warnings == []


def test_unknown_tap_names_nearest_known():
    msg = err(rec().record, 0, "Qcur-0", z(1, 1, T, 256))
    assert "s0/Qcur-0" in msg and "unknown tap" in msg
    assert "Qcur-0.add" in msg and "Qcur-0.mul_mat" in msg


def test_hf_module_name_is_mapped_in_the_error():
    msg = err(rec().record, 0, "model.layers.0.self_attn.q_proj", z(1, 1, T, 256))
    assert "Hugging Face" in msg and "Qcur-0.add (qwen2)" in msg and "Qcur-0.mul_mat (llama)" in msg


def test_step_outside_the_golden():
    msg = err(rec().record, 7, "embd", z(1, 1, 1, 256))
    assert "s7/embd" in msg and "s0..s4" in msg


def test_layer_outside_the_model():
    msg = err(rec().record, 0, "attn_norm-5", z(1, 1, T, 256))
    assert "layers 0..1" in msg and "attn_norm-0" in msg


def test_scores_tokens_first_get_a_transpose_hint():
    # kq-0 with H=4, T=9 given [1, T, H, kv] instead of [1, H, T, kv].
    msg = err(rec().record, 0, "kq-0", z(1, T, 4, T))
    assert "expected shape [1, 4, 9, 9]" in msg and "found [1, 9, 4, 9]" in msg
    assert "tokens-first" in msg and "transpose(0, 2, 1, 3)" in msg
    msg = err(rec().record, 0, "kq_soft_max-1", z(T, 4, T))  # squeezed and tokens-first
    assert "tokens-first" in msg


def test_rope_heads_first_gets_a_hint():
    msg = err(rec().record, 0, "Qcur-0.rope", z(1, 4, T, 64))
    assert "expected shape [1, 9, 4, 64]" in msg and "heads-first" in msg


def test_last_layer_all_rows_says_llamacpp_keeps_the_last_token():
    msg = err(rec().record, 0, "ffn_inp-1", z(1, 1, T, 256))
    assert "expected shape [1, 1, 1, 256]" in msg and "found [1, 1, 9, 256]" in msg
    assert "keeps only the last token" in msg and "x[..., -1:, :]" in msg
    assert "last token" in err(rec().record, 0, "result_output", z(T, 1024))
    # Not in layer 0: there every row is kept, so [1, 1, 1, 256] is simply wrong.
    msg = err(rec().record, 0, "ffn_inp-0", z(1, 1, 1, 256))
    assert "last token" not in msg and "9 row(s)" in msg


def test_padded_kv_view_gets_a_trim_hint():
    msg = err(rec().record, 1, "kq-0", z(1, 4, 1, 32))  # cache view padded to 32
    assert "expected shape [1, 4, 1, 10]" in msg and "x[..., :10]" in msg
    msg = err(rec().record, 1, "kq-0", z(1, 4, 1, 1))  # decode step that ignores the cache
    assert "lost positions" in msg


def test_flattened_heads_get_a_reshape_hint():
    msg = err(rec().record, 0, "kqv-0", z(1, 1, T, 256))
    assert "same element count" in msg and "[1, 4, 9, 64]" in msg


def test_wrong_width():
    msg = err(rec().record, 0, "Kcur-0.add", z(1, 1, T, 256))  # GQA: K is 2 heads * 64 wide
    assert "expected shape [1, 1, 9, 128]" in msg and "width 256 instead of 128" in msg


def test_integer_data_and_bad_names_are_rejected():
    assert "expected a float tensor" in err(rec().record, 0, "embd", z(1, 1, T, 256, dtype=np.int32))
    assert "tap name" in err(rec().record, 0, "s0/embd", z(1, 1, T, 256))
    assert "step must be" in err(rec().record, -1, "embd", z(1, 1, T, 256))


def test_half_precision_is_widened_to_f32():
    r = rec()
    x = (np.arange(T * 256, dtype=np.float32).reshape(T, 256) / 7).astype(np.float16)
    r.record(0, "embd", x)
    np.testing.assert_array_equal(r.tensors["s0/embd"][0, 0], x.astype(np.float32))


def test_strict_false_records_and_collects_warnings():
    r = rec(strict=False)
    with pytest.warns(UserWarning):
        r.record(0, "kq-0", z(1, T, 4, T))
    with pytest.warns(UserWarning):
        r.record(0, "Qcur-0", z(1, 1, T, 256))
    assert "s0/kq-0" in r.tensors and "s0/Qcur-0" in r.tensors
    assert len(r.warnings) == 2 and "tokens-first" in r.warnings[0]


def test_recording_twice_is_an_error():
    r = rec()
    r.record(0, "embd", z(T, 256))
    assert "recorded twice" in err(r.record, 0, "embd", z(T, 256))


def test_wants_and_missing():
    r = rec()
    g = Golden.open(QWEN)
    assert r.wants(0, "Qcur-0.add") and r.wants(4, "result_output")
    assert not r.wants(0, "Qcur-0") and not r.wants(5, "embd")
    n = len([k for k in g.entries if k.startswith("s")])
    assert len(r.missing()) == n == 240
    r.record(0, "embd", z(T, 256))
    assert len(r.missing()) == n - 1 and "s0/embd" not in r.missing()
    assert r.missing()[0] == "s0/Kcur-0.add"  # natural order: step, then name


def test_real_golden_implies_full_logits_at_decode_steps():
    # qwen2.5-coder's golden keeps only the top 64 logits of decode steps; the dump needs them all.
    r = rec(golden=REAL)
    vocab = Golden.open(REAL).vocab()
    assert vocab == 151936
    assert r.wants(3, "result_output") and "s3/result_output" in r.missing()
    r.record(3, "result_output", z(vocab))
    assert r.tensors["s3/result_output"].shape == (1, 1, 1, vocab)
    assert "expected shape [1, 1, 1, 151936]" in err(r.record, 2, "result_output", z(1000))
    # Layers the golden does not keep: not wanted, and the error says so.
    assert not r.wants(0, "attn_norm-5") and r.wants(0, "attn_norm-12")
    msg = err(r.record, 0, "attn_norm-5", z(4, 896))
    assert "keeps attn_norm-{L} only for layers 0, 1, 12, 23" in msg and "wants" in msg


def test_tokens():
    r = rec()
    ids = r.golden_tokens()
    assert ids.dtype == np.int32 and ids.tolist() == [785, 922, 865, 293, 651, 77, 282, 78, 87]
    assert r.golden_continuation()[:5].tolist() == [656, 656, 60, 604, 337]
    r.set_tokens(ids.astype(np.int64)[None])  # [1, n] is accepted
    assert r.tokens.dtype == np.int32 and r.tokens.shape == (9,)
    assert "has 9 tokens, found 8" in err(r.set_tokens, ids[:8])
    assert "integer token ids" in err(r.set_tokens, np.array([0.5, 1.0]))


def test_no_golden_checks_only_form():
    r = Recorder()
    assert r.wants(99, "anything-0")
    r.record(3, "my_tap-0", z(5, 7))
    assert r.tensors["s3/my_tap-0"].shape == (1, 1, 5, 7) and r.missing() == []


def test_save_round_trip(tmp_path):
    r = rec()
    x = np.random.default_rng(0).standard_normal((T, 256)).astype(np.float32)
    r.record(0, "embd", x)
    r.record(1, "result_output", np.ones(1024, dtype=np.float64))
    r.set_tokens(r.golden_tokens())
    out = tmp_path / "dump.safetensors"
    r.save(out)
    back = load_file(str(out))
    assert sorted(back) == ["s0/embd", "s1/result_output", "tokens"]
    assert back["s0/embd"].dtype == np.float32 and back["s0/embd"].shape == (1, 1, T, 256)
    np.testing.assert_array_equal(back["s0/embd"][0, 0], x)
    assert back["tokens"].dtype == np.int32 and back["tokens"].tolist() == r.golden_tokens().tolist()
    assert os.listdir(tmp_path) == ["dump.safetensors"]  # no temporary file left


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    import safetensors.numpy

    out = tmp_path / "dump.safetensors"
    out.write_bytes(b"previous dump")
    r = rec()
    r.record(0, "embd", z(T, 256))
    r.set_tokens(r.golden_tokens())

    def failing_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        r.save(out)
    assert out.read_bytes() == b"previous dump"
    assert os.listdir(tmp_path) == ["dump.safetensors"]


def test_save_without_tokens_warns_and_empty_is_an_error(tmp_path):
    r = rec()
    assert "nothing recorded" in err(r.save, tmp_path / "x.safetensors")
    r.record(0, "embd", z(T, 256))
    with pytest.warns(UserWarning, match="no tokens"):
        r.save(tmp_path / "x.safetensors")
    assert "tokens" not in load_file(str(tmp_path / "x.safetensors"))


def test_bad_golden_files_name_the_file(tmp_path):
    p = tmp_path / "not.safetensors"
    p.write_bytes(b"hello")
    assert str(p) in err(Recorder, p) and "not a safetensors file" in err(Recorder, p)
    p.write_bytes((10).to_bytes(8, "little") + b"{not json}")
    assert "not JSON" in err(Recorder, p)
    assert "cannot read" in err(Recorder, tmp_path / "absent.safetensors")


def test_llama_golden_names():
    r = rec(golden=LLAMA)
    r.record(0, "Vcur-0", z(T, 128))  # llama's V has no bias: plain Vcur-0
    assert "Vcur-0.add" not in " ".join(Golden.open(LLAMA).taps())
    r.record(0, "attn_out-0", z(T, 256))
    assert "unknown tap 'attn_out-0'" in err(rec().record, 0, "attn_out-0", z(T, 256))  # qwen2: none


def test_torch_tensors_are_accepted():
    try:
        import torch
    except ImportError:
        require_or_skip("torch is not installed: torch tensors as input not tested")
    r = rec()
    x = torch.randn(1, T, 256, dtype=torch.bfloat16, requires_grad=True)
    r.record(0, "embd", x)
    np.testing.assert_array_equal(r.tensors["s0/embd"][0, 0], x.detach().float().numpy()[0])
    r.set_tokens(torch.tensor(r.golden_tokens().tolist()))
    assert r.tokens.tolist() == r.golden_tokens().tolist()


# -- row-subset taps (the long goldens keep some token rows of a long prefill's taps) --------------------
LONG = golden_taps("smollm2-135m/exact/long")  # 1,134 prompt tokens; W=576, H=9
LONG_T = 1134
KEPT_L_OUT = (0, 1, 63, 64, 79, 80, 81, 127, 128, 255, 256, 511, 512, 513, 767, 1023, 1133)


def test_a_whole_row_subset_tap_is_stored_as_the_golden_rows():
    r = rec(golden=LONG)
    assert r.positions(0, "l_out-0") == KEPT_L_OUT and r.positions(0, "kq-0") == (79, 80, 511, 512)
    assert r.positions(1, "l_out-0") is None and r.positions(0, "l_out-29") is None
    x = np.arange(LONG_T, dtype=np.float64)[:, None] * np.ones((1, 576))  # row p holds p
    r.record(0, "l_out-0", x)  # [T, W]: the whole tap, size-1 axes dropped
    got = r.tensors["s0/l_out-0"]
    assert got.shape == (1, 1, 17, 576) and got.dtype == np.float32
    assert tuple(int(v) for v in got[0, 0, :, 0]) == KEPT_L_OUT and np.all(got[0, 0, :, 575] == got[0, 0, :, 0])
    kq = np.arange(LONG_T, dtype=np.float32)[None, None, :, None] + np.zeros((1, 9, 1, LONG_T), np.float32)
    kq[:, 3] += 10000  # head 3 stays head 3
    r.record(0, "kq-0", kq)
    got = r.tensors["s0/kq-0"]
    assert got.shape == (1, 9, 4, LONG_T)
    assert got[0, 0, :, 7].tolist() == [79, 80, 511, 512] and got[0, 3, :, 0].tolist() == [10079, 10080, 10511, 10512]
    r.record(0, "embd", np.ones((17, 576)))  # the kept rows themselves are taken as they are
    assert r.tensors["s0/embd"].shape == (1, 1, 17, 576) and r.warnings == []


def test_a_row_count_neither_whole_nor_kept_is_refused():
    msg = err(rec(golden=LONG).record, 0, "l_out-1", z(1, 1, 1000, 576))
    for needle in ("s0/l_out-1", "17 rows at positions 0, 1, 63, 64, 79, … (11 more), 1133", "[1, 1, 17, 576] (those rows)",
                   f"[1, 1, {LONG_T}, 576] (the whole tap", "found [1, 1, 1000, 576]", "Recorder.positions"):
        assert needle in msg, msg
    msg = err(rec(golden=LONG).record, 0, "kq_soft_max-0", z(1, LONG_T, 9, LONG_T))  # tokens-first
    assert f"[1, 9, {LONG_T}, {LONG_T}] (the whole tap" in msg, msg
    r = rec(strict=False, golden=LONG)
    with pytest.warns(UserWarning):
        r.record(0, "l_out-1", z(1, 1, 1000, 576))
    assert r.tensors["s0/l_out-1"].shape == (1, 1, 1000, 576) and len(r.warnings) == 1


def test_malformed_rows_in_a_golden_are_a_clear_error(tmp_path):
    from safetensors.numpy import save_file

    p = tmp_path / "g.safetensors"
    save_file({"s0/l_out-0": z(1, 1, 2, 4), "rows/s0/l_out-0": np.array([3, 1], np.int32),
               "tokens": np.arange(5, dtype=np.int32)}, str(p))
    msg = err(rec(golden=p).record, 0, "l_out-0", z(1, 1, 5, 4))
    assert str(p) in msg and "rows/s0/l_out-0" in msg and "ascending" in msg, msg


def test_diff_compares_a_whole_row_subset_tap_on_the_kept_rows():
    from lockstep_kit.diff import compare

    g = {"s0/l_out-0": np.arange(8, dtype=np.float32).reshape(1, 1, 2, 4), "rows/s0/l_out-0": np.array([1, 3], np.int32)}
    whole = np.full((1, 1, 5, 4), np.nan, np.float32)
    whole[0, 0, [1, 3]] = g["s0/l_out-0"][0, 0]
    assert compare({"s0/l_out-0": whole}, g) == [("s0/l_out-0", 0.0, 0.0)]
