#!/usr/bin/env python3
"""Writes the fuzz targets' seed inputs into fuzz/seeds/{gguf,compare,suite,manifest}/ (deterministic).

The committed corpora (fuzz/corpus/TARGET) are these seeds plus what the long runs found, minimized with
libFuzzer's -merge=1 (ci/fuzz --minimize TARGET). Needs numpy, safetensors and gguf (the kit venv:
~/.cache/lockstep/kit-venv/bin/python fuzz/seeds.py).
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save, load_file
import gguf

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fuzz" / "seeds"
rng = np.random.default_rng(15)


def put(target, name, data: bytes):
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


# --- GGUF: miniature models (every dequantizable type, metadata of every value type) ---------------
Q = gguf.GGMLQuantizationType


def gguf_bytes(build, alignment=None):
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "tmp.gguf"
    w = gguf.GGUFWriter(str(path), arch=None)
    if alignment:
        w.add_uint32("general.alignment", alignment)
    build(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    b = path.read_bytes()
    path.unlink()
    return b


def raw(w, name, ty, ne):
    """A tensor of ggml type `ty` with shape ne (ggml order): random values, or random blocks."""
    rows = int(np.prod(ne[1:]))
    plain = {Q.F32: np.float32, Q.F16: np.float16, Q.I32: np.int32}
    if ty in plain:
        data = rng.standard_normal((rows, ne[0])).astype(plain[ty]) if ty != Q.I32 else rng.integers(-9, 9, (rows, ne[0]), dtype=np.int32)
        w.add_tensor(name, data.reshape(tuple(reversed(ne))))
        return
    bs, ts = gguf.GGML_QUANT_SIZES[ty]
    data = rng.integers(0, 256, (rows, ne[0] // bs * ts), dtype=np.uint8)
    w.add_tensor(name, data.reshape(tuple(reversed(ne[1:])) + (ne[0] // bs * ts,)), raw_dtype=ty)


def model(arch, vocab=8):
    def build(w):
        w.add_string("general.architecture", arch)
        w.add_string("general.name", f"fuzz-{arch}")
        w.add_uint32(f"{arch}.block_count", 1)
        w.add_uint32(f"{arch}.context_length", 64)
        w.add_uint32(f"{arch}.embedding_length", 32)
        w.add_uint32(f"{arch}.feed_forward_length", 64)
        w.add_uint32(f"{arch}.attention.head_count", 2)
        w.add_uint32(f"{arch}.attention.head_count_kv", 1)
        w.add_float32(f"{arch}.rope.freq_base", 10000.0)
        w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", "qwen2" if arch == "qwen2" else "smollm")
        toks = ["a", "b", "Ġ", "ab", "Ġa", "<|endoftext|>", "<|im_start|>", "<|im_end|>"][:vocab]
        w.add_array("tokenizer.ggml.tokens", toks)
        w.add_array("tokenizer.ggml.token_type", [1] * (len(toks) - 3) + [3, 3, 3])
        w.add_array("tokenizer.ggml.merges", ["a b", "Ġ a"])
        w.add_uint32("tokenizer.ggml.bos_token_id", 5)
        w.add_uint32("tokenizer.ggml.eos_token_id", 7)
        w.add_bool("tokenizer.ggml.add_bos_token", False)
        w.add_string("tokenizer.chat_template", "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}")
        raw(w, "token_embd.weight", Q.Q8_0, [32, vocab])
        raw(w, "output_norm.weight", Q.F32, [32])
        raw(w, "blk.0.attn_q.bias", Q.F32, [32])
        raw(w, "blk.0.attn_q.weight", Q.F16, [32, 32])
        raw(w, "blk.0.ffn_down.weight", Q.Q4_K, [256, 1])
    return build


def every_type(w):
    w.add_string("general.architecture", "llama")
    for i, ty in enumerate([Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.I32]):
        bs, _ = gguf.GGML_QUANT_SIZES[ty]
        raw(w, f"t{i}.{ty.name}", ty, [bs, 1] if bs > 1 else [4, 2])


def every_value(w):
    w.add_string("general.architecture", "qwen2")
    w.add_uint8("v.u8", 200)
    w.add_int8("v.i8", -3)
    w.add_uint16("v.u16", 65535)
    w.add_int16("v.i16", -300)
    w.add_uint32("v.u32", 7)
    w.add_int32("v.i32", -7)
    w.add_float32("v.f32", 0.5)
    w.add_bool("v.bool", True)
    w.add_string("v.str", "héllo")
    w.add_uint64("v.u64", 2**40)
    w.add_int64("v.i64", -(2**40))
    w.add_float64("v.f64", 1e-300)
    w.add_array("v.arr_u8", [1, 2, 3])
    w.add_array("v.arr_str", ["x", "", "zz"])
    w.add_array("v.arr_f32", [1.5, -2.0])
    w.add_array("v.arr_bool", [True, False])
    w.add_array("v.nested", [[1, 2], [3]])
    w.add_array("v.empty", [])


put("gguf", "qwen2-model.gguf", gguf_bytes(model("qwen2")))
put("gguf", "llama-model-align64.gguf", gguf_bytes(model("llama", vocab=6), alignment=64))
put("gguf", "every-type.gguf", gguf_bytes(every_type))
put("gguf", "every-value.gguf", gguf_bytes(every_value))
v2 = bytearray(gguf_bytes(every_value))
v2[4:8] = (2).to_bytes(4, "little")
put("gguf", "version2.gguf", bytes(v2))
put("gguf", "header-only.gguf", b"GGUF" + (3).to_bytes(4, "little") + bytes(16))

# --- compare: dumps judged against golden tiny-qwen2/exact/fox ------------------------------------
G = load_file(str(ROOT / "golden/taps/tiny-qwen2/exact/fox.safetensors"))


def dump(name, tensors):
    put("compare", name, save({k: np.ascontiguousarray(v) for k, v in tensors.items()}))


logits0 = G["s0/result_output"]
dump("exact-logits.safetensors", {"tokens": G["tokens"], "s0/result_output": logits0, "s0/kq_soft_max-0": G["s0/kq_soft_max-0"]})
dump("decode-steps.safetensors", {k: G[k] for k in ["s0/result_output", "s1/result_output", "s1/kq-0", "s1/ffn_inp-1", "s2/result_output", "s2/norm", "continuation"]})
dump("f16-i64.safetensors", {"tokens": G["tokens"].astype(np.int64), "s0/result_output": logits0.astype(np.float16), "s0/kq-1": G["s0/kq-1"].astype(np.float16)})
dump("bf16-f64.safetensors", {"s0/result_output": logits0.astype(np.float64), "s0/result_norm": G["s0/result_norm"].astype(np.float64)})
dump("squeezed.safetensors", {"s0/result_output": logits0.reshape(-1), "s0/kq-0": G["s0/kq-0"].reshape(4, 9, 9), "s0/norm": G["s0/norm"].reshape(256)})
dump("tokens-first-scores.safetensors", {"s0/result_output": logits0, "s0/kq-0": G["s0/kq-0"].transpose(0, 2, 1, 3)})
bad = G["s0/kq_soft_max-1"].copy()
bad[0, 1] *= 1.5
dump("diverges-layer1.safetensors", {"tokens": G["tokens"], "s0/result_output": logits0 + 0.5, "s0/kq_soft_max-0": G["s0/kq_soft_max-0"], "s0/kq_soft_max-1": bad})
dump("last-row-all-rows.safetensors", {"s0/result_output": np.repeat(logits0, 9, axis=2), "s0/norm": np.repeat(G["s0/norm"], 9, axis=2)})
dump("nan-inf.safetensors", {"s0/result_output": np.where(np.arange(1024) % 7 == 0, np.nan, logits0), "s0/result_norm": np.full((1, 1, 1, 256), np.inf, np.float32)})
dump("integer-tap-and-unknown.safetensors", {"s0/result_output": logits0.astype(np.int32), "s0/Qcur-0": np.zeros((1, 1, 9, 256), np.float32), "s9/embd": np.zeros((1, 1, 1, 256), np.float32), "logits": logits0})
dump("hf-names.safetensors", {"model.layers.0.self_attn.q_proj": np.zeros((9, 256), np.float32), "lm_head": np.zeros((1, 1024), np.float32)})
dump("no-logits.safetensors", {"s0/kq-0": G["s0/kq-0"], "tokens": G["tokens"]})
dump("empty.safetensors", {})
put("compare", "not-safetensors.bin", b"GGUF\x03\x00\x00\x00" + bytes(24))

# --- suite: the committed suites and a few variants ----------------------------------------------
for p in sorted((ROOT / "suites").rglob("*.toml")):
    put("suite", p.relative_to(ROOT / "suites").as_posix().replace("/", "__"), p.read_bytes())
put("suite", "on-demand.toml", b'''model = "tiny-qwen2"
backends = ["cpu"]
checks = ["tokens", "taps", "logits"]
[[case]]
name = "od"
tier = "shipped"
golden = { prompt = "Once upon a time", steps = 3, taps = "l_out,kq_soft_max" }
[[case]]
name = "chat"
tier = "exact"
model = "tiny-llama"
golden = { chat = [{ role = "user", content = "hi" }], tier = "exact" }
[[case.tolerance]]
backend = "cpu"
tier = "exact"
key = "taps.rel_l2:kq"
limit = 2e-5
reason = "measured"
''')

# --- manifest: small manifests in each accepted layout -------------------------------------------
M = json.loads((ROOT / "golden/manifest.json").read_text())
files = M["files"]
fox = next(f for f in files if f["path"] == "taps/tiny-qwen2/exact/fox.safetensors")
small = dict(fox, tensors=[t for t in fox["tensors"] if t["key"] in ("s0/embd", "s0/norm-0.rms_norm.0", "s0/kq-0", "s0/kq_soft_max-0", "s1/norm", "s0/result_output", "tokens")])
others = [dict(f, tensors=f.get("tensors", [])[:2]) for f in files if f.get("kind") != "taps"][:3]
head = {k: v for k, v in M.items() if k != "files"}
put("manifest", "files.json", json.dumps(dict(head, files=[small] + others), indent=1).encode())
put("manifest", "entries.json", json.dumps({"schema": 1, "entries": [dict(small, arch="qwen2", n_layer=2, full_layers=[0, 1], kept={"layers": [0]})]}).encode())
put("manifest", "array.json", json.dumps([{"path": "taps/m/t/p.safetensors", "sha256": "00", "kind": "taps", "model": "m", "tier": "exact", "prompt_id": "p",
                                          "tensors": [{"key": "s0/norm", "noise": {"rel_l2": 1e-7, "row_max": 2e-7}}, {"key": "s0/l_out-3"}]}]).encode())
put("manifest", "minimal.json", b'{"files": []}')
