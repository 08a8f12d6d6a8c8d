"""The tiny synthetic models: tiny-qwen2 and tiny-llama.

Deterministic (numpy PCG64, fixed seeds below), written with the gguf package. Each keeps its
architecture's features (qwen2: Q/K/V bias, NeoX RoPE, GQA, untied output; llama: no bias,
adjacent-pair RoPE, GQA, tied embeddings) at hidden 256 (4 heads of 64, 2 KV heads), FFN 512, 2 layers,
so that K-quants apply (row lengths are multiples of 256).

Weights have realistic scales so that bugs show: norm weights near 1, large Q/K biases (qwen2's are
tens), a few outlier residual channels. The tokenizer is the real model's, truncated to its first
tokens plus every special token, with the merges among the kept tokens: llama.cpp accepts it as is.

Each model comes as an F32 file and a quantized file made by llama.cpp's own quantize API:
tiny-qwen2.q.gguf is Q4_K_M (Q4_K + Q6_K) with Q8_0 token embeddings and a Q5_0 output head;
tiny-llama.q.gguf is Q4_0 with Q4_1 token embeddings (tied, so also the output head).
Together: Q4_0, Q4_1, Q5_0, Q8_0, Q4_K and Q6_K.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGMLQuantizationType

from ggufutil import copy_metadata, field_value

N_VOCAB = 1024
HIDDEN, N_HEAD, N_HEAD_KV, HEAD_DIM, FFN, N_LAYER = 256, 4, 2, 64, 512, 2
OUTLIER_CHANNELS = (3, 77, 200)

TINY = {
    # id: (source real model, architecture, seed, rope base, rms eps, tied, qkv bias, quantization)
    "tiny-qwen2": dict(source="qwen2.5-coder-0.5b", arch="qwen2", seed=20251125, rope_base=1e6, eps=1e-6,
                       tied=False, bias=True, ftype=15, token_embd_type=8, output_type=6),
    "tiny-llama": dict(source="smollm2-135m", arch="llama", seed=20251126, rope_base=1e5, eps=1e-5,
                       tied=True, bias=False, ftype=2, token_embd_type=3, output_type=-1),
}

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def truncated_vocab(reader: GGUFReader):
    """First tokens of the real vocabulary plus every special token, renumbered contiguously.
    Returns (tokens, types, merges, old→new id map)."""
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    types = list(reader.fields["tokenizer.ggml.token_type"].contents())
    special = [i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)]
    n_regular = N_VOCAB - len([i for i in special if i >= N_VOCAB])
    keep = list(range(n_regular)) + [i for i in special if i >= n_regular]
    assert len(keep) == N_VOCAB, (len(keep), N_VOCAB)
    remap = {old: new for new, old in enumerate(keep)}
    kept_tokens = [tokens[i] for i in keep]
    vocab = set(kept_tokens)
    merges = []
    for m in reader.fields["tokenizer.ggml.merges"].contents():
        left, right = m.split(" ", 1)
        if left in vocab and right in vocab and left + right in vocab:
            merges.append(m)
    return kept_tokens, [types[i] for i in keep], merges, remap


def weights(cfg: dict, n_vocab: int) -> dict[str, np.ndarray]:
    """Every tensor, row-major with ggml's ne reversed: a projection is [out, in]."""
    rng = np.random.Generator(np.random.PCG64(cfg["seed"]))

    def mat(n_out, n_in, scale=1.0):
        return (rng.standard_normal((n_out, n_in)) * scale / np.sqrt(n_in)).astype(np.float32)

    def norm_weight():
        w = np.abs(1.0 + 0.2 * rng.standard_normal(HIDDEN))
        w[list(OUTLIER_CHANNELS)] *= 0.1  # as in real models: norms damp the outlier channels
        return w.astype(np.float32)

    def bias(n, scale, n_large, large):
        b = scale * rng.standard_normal(n)
        idx = rng.choice(n, n_large, replace=False)
        b[idx] = large * np.sign(rng.standard_normal(n_large))
        return b.astype(np.float32)

    w: dict[str, np.ndarray] = {}
    embd = 0.05 * rng.standard_normal((n_vocab, HIDDEN))
    embd[:, list(OUTLIER_CHANNELS)] *= 12.0  # large-magnitude residual channels
    w["token_embd.weight"] = embd.astype(np.float32)
    kv = N_HEAD_KV * HEAD_DIM
    for i in range(N_LAYER):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm_weight()
        w[p + "attn_q.weight"] = mat(HIDDEN, HIDDEN)
        w[p + "attn_k.weight"] = mat(kv, HIDDEN)
        w[p + "attn_v.weight"] = mat(kv, HIDDEN)
        if cfg["bias"]:
            w[p + "attn_q.bias"] = bias(HIDDEN, 0.5, 8, 6.0)
            w[p + "attn_k.bias"] = bias(kv, 2.0, 6, 20.0)
            w[p + "attn_v.bias"] = bias(kv, 0.1, 0, 0.0)
        w[p + "attn_output.weight"] = mat(HIDDEN, HIDDEN, 0.5)
        w[p + "ffn_norm.weight"] = norm_weight()
        w[p + "ffn_gate.weight"] = mat(FFN, HIDDEN)
        w[p + "ffn_up.weight"] = mat(FFN, HIDDEN)
        w[p + "ffn_down.weight"] = mat(HIDDEN, FFN, 0.5)
    w["output_norm.weight"] = norm_weight()
    if not cfg["tied"]:
        w["output.weight"] = mat(n_vocab, HIDDEN, 4.0)
    return w


def write_f32(model_id: str, source: Path, dst: Path) -> None:
    cfg = TINY[model_id]
    reader = GGUFReader(source)
    tokens, types, merges, remap = truncated_vocab(reader)
    arch = cfg["arch"]
    S, U32, F32, ARR = GGUFValueType.STRING, GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.ARRAY
    overrides = {
        "general.name": (model_id, S, None),
        "general.file_type": (0, U32, None),
        "tokenizer.ggml.tokens": (tokens, ARR, S),
        "tokenizer.ggml.token_type": (types, ARR, GGUFValueType.INT32),
        "tokenizer.ggml.merges": (merges, ARR, S),
        f"{arch}.block_count": (N_LAYER, U32, None),
        f"{arch}.context_length": (1024, U32, None),
        f"{arch}.embedding_length": (HIDDEN, U32, None),
        f"{arch}.feed_forward_length": (FFN, U32, None),
        f"{arch}.attention.head_count": (N_HEAD, U32, None),
        f"{arch}.attention.head_count_kv": (N_HEAD_KV, U32, None),
        f"{arch}.rope.freq_base": (cfg["rope_base"], F32, None),
        f"{arch}.attention.layer_norm_rms_epsilon": (cfg["eps"], F32, None),
    }
    for key in ("bos", "eos", "unknown", "padding", "eot"):
        name = f"tokenizer.ggml.{key}_token_id"
        if name in reader.fields:
            old = int(reader.fields[name].contents())
            overrides[name] = (remap[old], U32, None)

    def skip(k: str) -> bool:
        keep_general = k in ("general.name", "general.file_type", "general.type")
        return (k.startswith("general.") and not keep_general) or (
            k.startswith(arch + ".") and k not in overrides)

    tmp = dst.with_suffix(".partial")
    writer = GGUFWriter(tmp, arch)
    copy_metadata(reader, writer, overrides=overrides, skip=skip)
    for name, arr in weights(cfg, len(tokens)).items():
        writer.add_tensor(name, arr, raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(dst)


def quantize(model_id: str, src: Path, dst: Path, threads: int) -> None:
    import llama_cpp as L
    cfg = TINY[model_id]
    params = L.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = cfg["ftype"]
    params.token_embedding_type = cfg["token_embd_type"]
    if cfg["output_type"] >= 0:
        params.output_tensor_type = cfg["output_type"]
    tmp = dst.with_suffix(".partial")
    rc = L.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src}) failed with {rc}")
    tmp.rename(dst)


def make(model_id: str, sources: dict[str, Path], out_dir: Path, threads: int) -> tuple[Path, Path]:
    """Writes out_dir/{id}.f32.gguf and out_dir/{id}.q.gguf; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    f32 = out_dir / f"{model_id}.f32.gguf"
    q = out_dir / f"{model_id}.q.gguf"
    write_f32(model_id, sources[TINY[model_id]["source"]], f32)
    quantize(model_id, f32, q, threads)
    return f32, q
