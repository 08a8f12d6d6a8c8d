"""The anti-cheat check's reference (check 9, src/checks/anticheat.rs): what llama.cpp generates for
every prompt that check can pick.

The check's prompt depends on the minute it runs ("Write a haiku about GPU computing that includes the
word forty-six", 60 words), so its diversity gate cannot take its limits from the golden prompts
alone: a small model's greedy text loops on some of these prompts (smollm2-135m on "four": "a tapestry
of computation, a tapestry of computation, …", repeated 4-gram fraction 0.76, past the 0.70 the golden
continuations allow). This writes, for each model, llama.cpp's greedy continuation of each of the 60
prompts in the exact tier (an F32 copy of the dequantized weights, f32 KV cache: the arithmetic the
check's CPU reference copies), rendered with the model's own chat template as the golden chat
prompts are, 32 tokens at most, the end-of-generation token included when one stops it (as
lockstep's generation does), into golden/anticheat/{model}.json. validate takes the anti-cheat
diversity limits from the golden continuations and these together (Limits::from_golden's rule).
ci/regenerate-golden writes them with the rest of golden/ (export_all); alone, for some models:

    "$(ci/golden/venv.sh)" ci/golden/anticheat.py MODEL_ID [MODEL_ID ...]

Deterministic: greedy, 2 threads, no sampling. The file is written under a temporary name, then renamed.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import capture
import export
import models
import prompts

REPO = Path(__file__).resolve().parents[2]
MAX_TOKENS = 32   # src/validate.rs GEN_TOKENS

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen").split()
TENS = ["", "", "twenty", "thirty", "forty", "fifty"]


def spell(n: int) -> str:
    """As src/checks/anticheat.rs spell: the English words for 0..=59."""
    if n < 20:
        return ONES[n]
    if n % 10 == 0:
        return TENS[n // 10]
    return f"{TENS[n // 10]}-{ONES[n % 10]}"


def prompt_text(word: str) -> str:
    """As src/checks/anticheat.rs prompt_now."""
    return f"Write a haiku about GPU computing that includes the word {word}"


# the models whose suites run check 9 (suites/*.toml: the `anticheat` check)
MODELS = ("qwen2.5-coder-0.5b", "smollm2-135m")


def reference(model_id: str, src: Path) -> dict:
    """llama.cpp's greedy continuation of the 60 prompts for the model file `src` (exact tier)."""
    sha = models.sha256_file(src)
    f32 = export.exact_copy(src, sha)
    template, bos, eos = prompts.chat_info(src)
    llm = capture.LlamaCpp(str(f32), "exact", export.THREADS, n_ctx=256)
    minutes = []
    try:
        for minute in range(60):
            word = spell(minute)
            text = prompts.render_messages(template, [{"role": "user", "content": prompt_text(word)}], True, bos, eos)
            ids = llm.tokenize(text)
            run = llm.run(ids, tapped_steps=-1, n_continue=MAX_TOKENS)
            cont = run.continuation if run.first_eog is None else run.continuation[: run.first_eog + 1]
            minutes.append({"minute": minute, "word": word, "prompt_tokens": len(ids), "tokens": cont})
            export.log(f"anticheat {model_id} {minute:2d} {word}: {len(cont)} tokens")
    finally:
        llm.close()
    return {"model": model_id, "model_sha256": sha, "tier": "exact", "max_tokens": MAX_TOKENS,
            "what": "llama.cpp's greedy continuation of each anti-cheat prompt (ci/golden/anticheat.py)",
            "provenance": export.library_provenance(), "minutes": minutes}


def write(doc: dict, out: Path) -> dict:
    """out/anticheat/{model}.json (temporary file, then rename); returns its manifest record."""
    rel = f"anticheat/{doc['model']}.json"
    (out / "anticheat").mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out / "anticheat", prefix=f".{doc['model']}.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
    os.chmod(tmp, 0o644)   # mkstemp's 0600 is for secrets, not goldens
    os.replace(tmp, out / rel)
    return {"path": rel, "kind": "anticheat", "model": doc["model"], "generator": "ci/golden/anticheat.py"}


def export_all(model_files: dict[str, Path], out: Path) -> list[dict]:
    """ci/regenerate-golden's step: the reference of each model of MODELS in `model_files`."""
    return [write(reference(m, Path(model_files[m])), out) for m in MODELS if m in model_files]


def main(argv: list[str]) -> int:
    """Standalone: writes golden/anticheat/{model}.json for each model id given and puts its record
    (sha256, size) into golden/manifest.json, the rest of the manifest unchanged."""
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    golden = REPO / "golden"
    for model_id in argv:
        rec = write(reference(model_id, models.ensure(model_id)), golden)
        export.finish_records([rec], golden, "ci/golden/anticheat.py")
        manifest = json.loads((golden / "manifest.json").read_text())
        manifest["files"] = sorted([f for f in manifest["files"] if f["path"] != rec["path"]] + [rec], key=lambda f: f["path"])
        export.write_manifest(manifest, golden)
        export.log(f"anticheat: wrote golden/{rec['path']} and its manifest record")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
