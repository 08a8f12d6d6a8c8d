"""On-demand goldens: every tap of every layer at every step for any GGUF model and prompt, written into
the cache. Run by `lockstep golden` (src/ondemand.rs), which finds this environment, builds it on first
use and resolves cache entries; see golden/README.md, "On-demand goldens".

    python ci/golden/ondemand.py (--model PATH | --fetch ID) (--prompt TEXT | --chat FILE.json)
        --exporter-version V [--model-id NAME] [--model-sha SHA] [--tier exact|shipped|both]
        [--steps N] [--taps all|FAM,FAM…] [--cache DIR]

An entry is `{cache}/{key}/` holding `manifest.json` (golden/manifest.json's schema, one taps record)
and `taps.safetensors`; key = sha256 of (model sha256, token ids, tier, steps, taps selection, exporter
version). An existing entry is reused without running the model. A new one is written into
`{cache}/.partial-{key}-{pid}/` and renamed into place only when complete, so an interrupted export
leaves no entry (and its partial directory is removed by the next export once its process is gone).

stdout: one JSON object per tier, {"tier", "key", "dir", "file", "entry", "hit", "bytes", "seconds",
"tokens", "tensors"}; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np

import capture
import export
import models
import prompts
from export import THREADS, log

DEFAULT_STEPS = 5            # steps with taps, the prefill included: as the committed goldens
FAULT_ENV = "LOCKSTEP_ONDEMAND_FAULT"   # tests only: "kill-before-rename" kills this process (SIGKILL)
                                        # once the entry is complete in its partial directory
NOISE_ARCHS = ("qwen2", "llama", "gemma3")   # what tests/outside_engine/numpy_engine.py evaluates in f64


class UsageError(Exception):
    pass


def read_chat(path: Path) -> list[dict]:
    """A chat file: a JSON list of {"role", "content"} messages, or {"messages": [...]}."""
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"--chat {path}: {e.strerror}")
    except json.JSONDecodeError as e:
        raise UsageError(f"--chat {path}: not JSON ({e})")
    msgs = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(msgs, list) or not msgs:
        raise UsageError(f"--chat {path}: expected a non-empty list of {{\"role\", \"content\"}} messages "
                         "(or an object with such a list under \"messages\")")
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise UsageError(f"--chat {path}: message {i} is not {{\"role\": string, \"content\": string}}: {m!r}")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def render_chat(vocab: capture.Vocab, messages: list[dict]) -> str:
    """The messages through the model's own chat template (add_generation_prompt), as prompts.render
    does for the committed goldens (bos/eos texts from tokenizer.ggml.bos/eos_token_id)."""
    template = vocab.meta("tokenizer.chat_template")
    if template is None:
        raise UsageError(f"--chat: {vocab.path} has no tokenizer.chat_template; give the text with --prompt instead")

    def text_of(key: str) -> str:
        tid = vocab.meta(key)
        return vocab.token_text(int(tid)) if tid is not None else ""
    return prompts.render_messages(template, messages, True, text_of("tokenizer.ggml.bos_token_id"),
                                   text_of("tokenizer.ggml.eos_token_id"))


def slug(text: str) -> str:
    """A short readable id for a prompt: its first words, lower case, joined by '-'."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    out = ""
    for w in words:
        if len(out) + len(w) + 1 > 32:
            break
        out = f"{out}-{w}" if out else w
    return out or "prompt"


def parse_taps(spec: str) -> list[str] | None:
    """None for "all", else the sorted tap families (`l_out`, `kq_soft_max`, `result_output`, …)."""
    if spec.strip() == "all":
        return None
    fams = sorted({f.strip() for f in spec.split(",") if f.strip()})
    if not fams:
        raise UsageError("--taps: expected `all` or a comma-separated list of tap families (l_out,kq_soft_max)")
    bad = [f for f in fams if not re.fullmatch(r"[A-Za-z0-9_]+", f)]
    if bad:
        raise UsageError(f"--taps: {bad} are not tap families (a family is a tap name without its layer "
                         "and stage: Qcur, kq_soft_max, l_out, result_output)")
    return fams


def entry_key(model_sha: str, tokens: list[int], tier: str, steps: int, taps: list[str] | None,
              exporter_version: str) -> str:
    ident = {"model_sha256": model_sha, "tokens": tokens, "tier": tier, "steps": steps,
             "taps": "all" if taps is None else taps, "exporter": exporter_version}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:24]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(cache: Path) -> None:
    """Partial directories of exports whose process is gone (killed, crashed)."""
    for d in cache.glob(".partial-*"):
        try:
            pid = int(d.name.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not pid_alive(pid):
            log(f"removing {d.name}, left by an interrupted export (process {pid})")
            shutil.rmtree(d, ignore_errors=True)


def entry_result(cache: Path, key: str, hit: bool, seconds: float) -> dict:
    d = cache / key
    m = json.loads((d / "manifest.json").read_text())
    f = m["files"][0]
    return {"tier": f["tier"], "key": key, "dir": str(d), "file": str(d / f["path"]), "entry": f"cache:{key}",
            "hit": hit, "bytes": sum(p.stat().st_size for p in d.iterdir() if p.is_file()),
            "seconds": round(seconds, 2), "tokens": len(f["tokens"]), "tensors": len(f["tensors"]),
            "model": f["model"]}


def export_one(args, cache: Path, model_path: Path, model_id: str, sha: str, arch: str, n_layer: int,
               prompt: dict, rendered: str, tokens: list[int], tier: str, taps: list[str] | None,
               key: str) -> None:
    """Runs llama.cpp and writes the entry `cache/key`, through a partial directory renamed into place."""
    steps = args.steps
    n_continue = max(export.CONTINUATION, steps)
    n_ctx = max(512, -(-(len(tokens) + n_continue) // 256) * 256)
    run_path = export.exact_copy(model_path, sha, log) if tier == "exact" else model_path
    # f32 on both tiers: an on-demand golden has no size budget to meet (the committed shipped goldens
    # are stored f16 for golden/'s), and some models' activations exceed f16's range (gemma3-270m's
    # shipped taps overflowed to inf when stored f16).
    dtype = np.float32
    seen: set[str] = set()

    def keep(step: int, tap: capture.Tap) -> bool:
        fam = capture.split_layer(tap.name)[0]
        seen.add(fam)
        return taps is None or fam in taps

    what = "every tap" if taps is None else f"the taps of families {', '.join(taps)}"
    kept = f"{what} of every layer at every step (on demand); stored {np.dtype(dtype).name}"
    partial = cache / f".partial-{key}-{os.getpid()}"
    partial.mkdir(parents=True)
    try:
        log(f"{model_id} {tier}: loading {run_path.name} in llama.cpp")
        llm = capture.LlamaCpp(str(run_path), tier, THREADS, n_ctx=n_ctx)
        t0 = time.time()
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.time()
            if done <= steps or done == total or now - last[0] > 5:
                last[0] = now
                what = "prefill" if done == 1 else f"step {done - 1}"
                taps_note = " (taps)" if done <= steps else ""
                log(f"{model_id} {tier}: {what}{taps_note} done [{done}/{total}], {now - t0:.1f} s")
        try:
            rec = export.export_taps(
                llm, partial, "taps.safetensors", model_id=model_id, model_sha256=sha,
                model_file=str(model_path.resolve()), tier=tier, prompt=prompt, rendered=rendered, tokens=tokens,
                n_layer=n_layer, keep=keep, dtype=dtype, full_layers=list(range(n_layer)), kept=kept,
                tapped_steps=steps - 1, n_continue=n_continue, progress=progress)
        finally:
            llm.close()
        if taps is not None:
            missing = [f for f in taps if f not in seen]
            if missing:
                raise UsageError(f"--taps: {model_id}'s graph has no tap family {', '.join(missing)}; "
                                 f"it has: {', '.join(sorted(seen))}")
        rec["arch"] = arch
        rec["ondemand_key"] = key
        export.finish_records([rec], partial, "lockstep golden")
        manifest = {
            "schema": 1, "generator": "lockstep golden (ci/golden/ondemand.py)", "command": "lockstep golden",
            "provenance": export.library_provenance(),
            "models": {model_id: {"sha256": sha, "file": str(model_path.resolve()), "arch": arch}},
            "tiers": {tier: export.TIER_DESCRIPTIONS[tier]},
            "ondemand": {"key": key, "exporter_version": args.exporter_version, "steps": steps,
                         "taps": "all" if taps is None else taps},
            "files": [rec]}
        if arch in NOISE_ARCHS:
            import noise
            log(f"{model_id} {tier}: noise: llama.cpp's distance from an f64 evaluation, per tap (ci/golden/noise.py)")
            noise.annotate(manifest, partial, log=log)
        else:
            manifest["noise_skipped"] = (f"architecture {arch}: the f64 evaluation (tests/outside_engine/"
                                         f"numpy_engine.py) covers {', '.join(NOISE_ARCHS)} only; tap limits "
                                         "fall back to the tier's fixed taps.rel_l2")
            log(f"{model_id} {tier}: no noise records ({manifest['noise_skipped']})")
        export.write_manifest(manifest, partial)
        if os.environ.get(FAULT_ENV) == "kill-before-rename":
            log(f"{FAULT_ENV}=kill-before-rename: killing this export before its rename")
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            os.rename(partial, cache / key)
        except OSError:
            if not (cache / key / "manifest.json").is_file():
                raise
            log(f"{key}: written meanwhile by another export; keeping that one")
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def main() -> int:
    ap = argparse.ArgumentParser(prog="ci/golden/ondemand.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="the GGUF file")
    src.add_argument("--fetch", metavar="ID", help=f"a model id to fetch with pip first ({', '.join(models.FETCHABLE)})")
    ap.add_argument("--model-id", help="the model's name in the manifest (default: the id, or the file's stem)")
    ap.add_argument("--model-sha", help="the file's sha256, when the caller already knows it")
    pr = ap.add_mutually_exclusive_group(required=True)
    pr.add_argument("--prompt", help="the prompt text, tokenized as is (add_special, parse_special)")
    pr.add_argument("--chat", type=Path, help="a JSON list of {role, content} messages, rendered with the "
                    "model's own chat template (add_generation_prompt)")
    ap.add_argument("--tier", choices=["exact", "shipped", "both"], default="exact")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                    help="steps with taps, the prefill included (default 5: the prefill and 4 decode steps)")
    ap.add_argument("--taps", default="all", help="all, or a comma-separated list of tap families")
    ap.add_argument("--cache", type=Path, default=models.cache_dir() / "goldens")
    ap.add_argument("--exporter-version", required=True,
                    help="part of every key (src/ondemand.rs passes a hash of this exporter's sources)")
    args = ap.parse_args()
    try:
        if args.steps < 1:
            raise UsageError(f"--steps {args.steps}: at least 1 (the prefill)")
        taps = parse_taps(args.taps)
        if args.fetch:
            model_path = models.ensure(args.fetch, log)
            model_id = args.model_id or args.fetch
        else:
            model_path = args.model
            if not model_path.is_file():
                raise UsageError(f"--model {model_path}: no such file")
            model_id = args.model_id or model_path.name.removesuffix(".gguf")
        sha = args.model_sha or models.sha256_file(model_path)
        try:
            vocab = capture.Vocab(str(model_path))
        except RuntimeError as e:
            raise UsageError(f"{model_path}: not a GGUF model llama.cpp can load ({e})")
        try:
            arch = vocab.meta("general.architecture") or "?"
            n_layer = int(vocab.meta(f"{arch}.block_count") or 0)
            if args.chat:
                messages = read_chat(args.chat)
                prompt = {"id": slug(next((m["content"] for m in reversed(messages) if m["role"] == "user"),
                                          messages[-1]["content"])), "chat": True, "messages": messages}
                rendered = render_chat(vocab, messages)
            else:
                prompt = {"id": slug(args.prompt), "chat": False, "text": args.prompt}
                rendered = args.prompt
            tokens = vocab.tokenize(rendered, add_special=True, parse_special=True)
        finally:
            vocab.close()
        if not tokens:
            raise UsageError("the prompt tokenizes to no tokens")
        cache = args.cache
        cache.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(cache)
        tiers = export.TIERS if args.tier == "both" else [args.tier]
        log(f"{model_id} ({arch}, {n_layer} layers, sha256 {sha[:12]}…): {len(tokens)} prompt tokens, "
            f"{args.steps} steps, taps {args.taps}, tier {', '.join(tiers)}")
        for tier in tiers:
            t0 = time.time()
            key = entry_key(sha, tokens, tier, args.steps, taps, args.exporter_version)
            hit = (cache / key / "manifest.json").is_file()
            if hit:
                log(f"{model_id} {tier}: cache hit {key}")
            else:
                export_one(args, cache, model_path, model_id, sha, arch, n_layer, prompt, rendered, tokens,
                           tier, taps, key)
            res = entry_result(cache, key, hit, time.time() - t0)
            if not hit:
                log(f"{model_id} {tier}: wrote {key}: {res['tensors']} tensors, {res['bytes'] / 1e6:.1f} MB, "
                    f"{res['seconds']:.1f} s")
            print(json.dumps(res), flush=True)
    except UsageError as e:
        print(f"ondemand: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
