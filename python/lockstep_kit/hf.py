"""Hugging Face transformers as an engine to judge: run a model on a golden's tokens, dump its taps.

    python -m lockstep_kit.hf --gguf MODEL.gguf --golden GOLDEN.safetensors --out dump.safetensors
    python -m lockstep_kit.hf --model-dir HF_CHECKPOINT_DIR --golden ... --out ...

Step 0 is the prefill of the golden's ``tokens``; step k >= 1 feeds ``continuation[k-1]`` (teacher
forcing) as one token through the KV cache (a DynamicCache), for every step the golden holds. Taps
come from forward hooks (see hf_names.py) and from an attention function registered with transformers
that calls the model's own eager attention and records Q/K after RoPE, the unscaled unmasked scores
(kq), the masked softmax (kq_soft_max) and the per-head output (kqv). Logits (``result_output``) are
recorded at every step, full vocabulary, last token only.

Needs torch, transformers, and for --gguf accelerate and gguf: pip install './python[hf]'.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
import time

import numpy as np

from . import hf_names, layout
from .errors import KitError
from .recorder import Recorder

ATTN_IMPL = "lockstep_eager"
_active = None  # the Capture whose model is running (the attention function is global in transformers)


def _need_hf():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            f"lockstep_kit.hf needs torch and transformers ({e.name} is missing): pip install './python[hf]'"
        ) from e


def register_attention():
    """Register ATTN_IMPL with transformers: eager attention of the model's own module, plus taps."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPL, _attention)
    # Same 4-D additive float mask as "eager" (0 where allowed, dtype min where masked).
    AttentionMaskInterface.register(ATTN_IMPL, eager_mask)


def _attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # query: [1, H, T, hd] after RoPE; key, value: [1, Hkv, kv_len, hd], the whole cache after update.
    eager = sys.modules[type(module).__module__].eager_attention_forward
    out, probs = eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if _active is not None:
        _active.attention(module, query, key, out, probs)
    return out, probs


def load_model(gguf=None, model_dir=None):
    """A float32 transformers causal LM from a GGUF file (dequantized by transformers) or a checkpoint."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    register_attention()
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    kw = {dtype_kw: torch.float32, "attn_implementation": ATTN_IMPL}
    if gguf is not None:
        if not os.path.isfile(gguf):
            raise KitError(f"{gguf}: no such GGUF file")
        d, name = os.path.split(os.path.abspath(gguf))
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, **kw)
    else:
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise KitError(f"{model_dir}: not a transformers checkpoint directory (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, **kw)
    model.eval()
    arch = model.config.model_type
    if arch not in hf_names.ARCHS:
        raise KitError(f"{gguf or model_dir}: architecture {arch!r}; the adapter knows {', '.join(hf_names.ARCHS)}")
    return model


class Capture:
    """Forward hooks on a transformers model, writing taps of the current ``step`` to a Recorder."""

    def __init__(self, model, rec: Recorder):
        self.model, self.rec = model, rec
        cfg = model.config
        self.arch = cfg.model_type
        self.n_layers = cfg.num_hidden_layers
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.step = 0
        self.handles = []

    # -- wiring ---------------------------------------------------------------------------------
    def attach(self):
        mods = dict(self.model.named_modules())
        for h in hf_names.hooks(self.arch):
            layers = range(self.n_layers) if "{L}" in h.module else [None]
            for L in layers:
                name = h.module.replace("{L}", str(L)) if L is not None else h.module
                if name not in mods:
                    raise KitError(f"the model has no module {name!r} (needed for {h.tap})")
                tap = h.tap.replace("{L}", str(L)) if L is not None else h.tap
                self.handles.append(
                    mods[name].register_forward_hook(self._hook(tap, h.io), with_kwargs=True)
                )
        for L in range(self.n_layers):
            lay = f"model.layers.{L}"
            # RMSNorm before its weight, from the norm's input.
            self.handles.append(mods[f"{lay}.input_layernorm"].register_forward_hook(
                self._rms_hook(f"norm-{L}.rms_norm.0"), with_kwargs=True))
            self.handles.append(mods[f"{lay}.post_attention_layernorm"].register_forward_hook(
                self._rms_hook(f"norm-{L}.rms_norm.1"), with_kwargs=True))
            if self.arch == "qwen2":
                for p, t in (("q_proj", "Qcur"), ("k_proj", "Kcur"), ("v_proj", "Vcur")):
                    self.handles.append(mods[f"{lay}.self_attn.{p}"].register_forward_hook(
                        self._no_bias_hook(f"{t}-{L}.mul_mat"), with_kwargs=True))
        self.handles.append(mods["model.norm"].register_forward_hook(self._rms_hook("norm"), with_kwargs=True))
        return self

    def detach(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    # -- hooks ----------------------------------------------------------------------------------
    def _hook(self, tap, io):
        def hook(module, args, kwargs, output):
            if io == "input":
                x = args[0] if args else next(iter(kwargs.values()))
            else:
                x = output[0] if isinstance(output, tuple) else output
            self.put(tap, x)
        return hook

    def _rms_hook(self, tap):
        def hook(module, args, kwargs, output):
            import torch

            x = (args[0] if args else kwargs["hidden_states"]).float()
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
            # The same expression as transformers' LlamaRMSNorm / Qwen2RMSNorm before the weight.
            self.put(tap, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
        return hook

    def _no_bias_hook(self, tap):
        def hook(module, args, kwargs, output):
            import torch.nn.functional as F

            self.put(tap, F.linear(args[0] if args else kwargs["input"], module.weight))
        return hook

    def attention(self, module, query, key, out, probs):
        """Taps of the attention function: query [1,H,T,hd], key [1,Hkv,kv,hd], out [1,T,H,hd]."""
        import torch

        L = module.layer_idx
        T = query.shape[2]
        groups = query.shape[1] // key.shape[1]
        k_all = key.repeat_interleave(groups, dim=1) if groups > 1 else key  # [1, H, kv, hd]
        self.put(f"Qcur-{L}.rope", query.transpose(1, 2))  # [1, T, H, hd]
        self.put(f"Kcur-{L}.rope", key[:, :, -T:, :].transpose(1, 2))  # this step's keys: [1, T, Hkv, hd]
        # llama.cpp's kq: q·k before the scale and the mask. The same matmul eager attention starts with.
        self.put(f"kq-{L}", torch.matmul(query, k_all.transpose(2, 3)))  # [1, H, T, kv]
        self.put(f"kq_soft_max-{L}", probs)  # [1, H, T, kv], masked entries 0
        self.put(f"kqv-{L}", out.transpose(1, 2))  # [1, H, T, hd]

    # -- recording ------------------------------------------------------------------------------
    def put(self, tap, x):
        """Record ``x`` (a [1, T, W] activation or a 4-D tensor) as ``tap`` of the current step."""
        if not self.rec.wants(self.step, tap):
            return
        if self.arch == "llama" and tap.split("-")[0] in ("Qcur", "Kcur"):
            x = hf_names.hf_to_llamacpp_qk_order(x, self.head_dim)
        if x.dim() == 3:  # [1, T, W] -> [1, 1, T, W]
            x = x.unsqueeze(1)
        if x.shape[-2] > 1 and layout.keeps_last_row_only(tap, self.n_layers):
            x = x[..., -1:, :]
        self.rec.record(self.step, tap, x)


def run(model, rec: Recorder, steps=None, log=print):
    """Prefill the golden's tokens, then teacher-forced decode steps; returns HF's greedy tokens."""
    global _active
    import torch
    from transformers import DynamicCache

    tokens = rec.golden_tokens().astype(np.int64)
    cont = rec.golden_continuation().astype(np.int64)
    n_steps = len(rec.golden.steps()) if steps is None else steps
    rec.set_tokens(tokens)
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:
        cache = DynamicCache()
    params = inspect.signature(model.forward).parameters
    cache_kw = "past_key_values" if "past_key_values" in params else "cache"
    cap = Capture(model, rec).attach()
    greedy = []
    _active = cap
    try:
        with torch.no_grad():
            for step in range(n_steps):
                cap.step = step
                ids = tokens if step == 0 else cont[step - 1: step]
                t0 = time.perf_counter()
                out = model(input_ids=torch.from_numpy(ids)[None], use_cache=True, **{cache_kw: cache})
                greedy.append(int(out.logits[0, -1].argmax()))
                log(f"step {step}: {len(ids)} token(s), {time.perf_counter() - t0:.2f} s, argmax {greedy[-1]}"
                    f" (golden continuation[{step}] = {int(cont[step])})")
    finally:
        _active = None
        cap.detach()
    return cap, greedy


def generate(model, tokens, n: int):
    """The model's own greedy continuation of ``tokens`` (n tokens, free-running, no taps recorded)."""
    import torch
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:
        cache = DynamicCache()
    cache_kw = "past_key_values" if "past_key_values" in inspect.signature(model.forward).parameters else "cache"
    out, ids = [], torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None]
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids, use_cache=True, **{cache_kw: cache}).logits
            nxt = int(logits[0, -1].argmax())  # first maximum, as llama.cpp's greedy sampler
            out.append(nxt)
            ids = torch.tensor([[nxt]])
    return out


def _template(tap):
    return re.sub(r"-\d+", "-{L}", tap)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lockstep_kit.hf", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", help="a GGUF file (qwen2 or llama); transformers dequantizes it to f32")
    src.add_argument("--model-dir", help="a transformers checkpoint directory")
    ap.add_argument("--golden", required=True, help="golden taps file: its tokens, continuation, keys and shapes")
    ap.add_argument("--out", required=True, help="the dump to write (safetensors)")
    ap.add_argument("--steps", type=int, default=None, help="steps to run (default: every step the golden holds)")
    ap.add_argument("--generate", type=int, default=None,
                    help="tokens of free-running greedy generation stored as `continuation` for the diversity "
                         "gate (default: as many as the golden's continuation; 0: none)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    _need_hf()
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rec = Recorder(golden=args.golden, strict=True)
        t0 = time.perf_counter()
        model = load_model(gguf=args.gguf, model_dir=args.model_dir)
        print(f"loaded {model.config.model_type} ({model.config.num_hidden_layers} layers) with transformers "
              f"{transformers.__version__}, torch {torch.__version__} in {time.perf_counter() - t0:.1f} s")
        cap, greedy = run(model, rec, args.steps)
        n_gen = len(rec.golden_continuation()) if args.generate is None else args.generate
        if n_gen > 0:
            t1 = time.perf_counter()
            gen = generate(model, rec.golden_tokens(), n_gen)
            rec.set_continuation(gen)
            same = next((i for i, (a, b) in enumerate(zip(gen, rec.golden_continuation())) if a != b), len(gen))
            print(f"greedy generation: {n_gen} tokens in {time.perf_counter() - t1:.1f} s, equal to the golden's "
                  f"continuation for the first {same}")
        rec.save(args.out)
    except KitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    missing = rec.missing()
    print(f"wrote {args.out}: {len(rec.tensors)} taps + tokens; golden keys not dumped: {len(missing)}")
    if missing:
        by_tap = {}
        for k in missing:
            by_tap.setdefault(_template(k.split("/", 1)[1]), []).append(k.split("/", 1)[0])
        for t, steps in sorted(by_tap.items()):
            print(f"  not dumped: {t} ({len(steps)} keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
