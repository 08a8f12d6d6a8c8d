"""The golden prompts, and their rendering through each model's own chat template.

`PROMPTS[model_id]` lists the prompts the golden script runs for that model. A prompt is a dict with
`id`, `chat` and either `messages` (chat=True: rendered with the GGUF's `tokenizer.chat_template`,
add_generation_prompt=True) or `text` (chat=False: used as is).

Rendering is llama-cpp-python's `Jinja2ChatFormatter` (jinja2 ImmutableSandboxedEnvironment,
trim_blocks, lstrip_blocks, loopcontrols, transformers' `tojson`), which is what both
`llama_cpp.Llama.create_chat_completion` and transformers' `apply_chat_template` do. bos_token /
eos_token are the texts of the GGUF's bos / eos token ids, as llama-cpp-python passes them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

# Chat prompts carry a short system message: the templates' default system prompts would add ~16 tokens
# to every prefill, and prefill taps are what the 64 MB golden budget is spent on (golden/README.md).
_SYSTEM = {"role": "system", "content": "Be concise."}
_HAIKU = {"id": "haiku", "chat": True,
          "messages": [_SYSTEM, {"role": "user", "content": "Write a haiku about GPU computing"}]}
_CODE = {"id": "code", "chat": False, "text": "def fibonacci(n):"}
_MULTITURN = {"id": "multiturn", "chat": True, "messages": [
    _SYSTEM,
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]}
_FOX = {"id": "fox", "chat": False, "text": "The quick brown fox"}


def long_code(n_kinds: int = 12) -> str:
    """A deterministic Python module of 4,028 characters (1,046 tokens for qwen2.5-coder-0.5b, 1,134 for
    smollm2-135m, measured with llama.cpp's tokenizers; 16 kinds would give 1,374 and 1,491): a record type, then one counting function per kind of stock move, each like the
    others but with its own names, field, factor and threshold. Built here rather than read from a file so
    that the prompt cannot change with the repository; no randomness (names come from fixed lists by
    index). The repetition is what long contexts look like (code, logs, tables): a model continues the
    pattern by attending to the earlier functions, hundreds of positions back, which is what a
    sliding-window or KV-length bug breaks."""
    kinds = ["receipt", "shipment", "transfer", "return", "adjustment", "count", "scrap", "reservation",
             "release", "pick", "pack", "load"]
    fields = ["quantity", "weight", "volume", "value"]
    lines = [
        '"""Stock moves of a small warehouse: one counter per kind of move, used by the nightly report."""',
        "from dataclasses import dataclass",
        "",
        "",
        "@dataclass",
        "class Move:",
        "    kind: str",
        "    item: str",
        "    quantity: int",
        "    weight: float",
        "    volume: float",
        "    value: float",
        "",
    ]
    for i, kind in enumerate(kinds[:n_kinds]):
        field = fields[i % len(fields)]
        factor = 2 + (i * 7) % 5
        limit = 10 * (i + 3)
        lines += [
            "",
            f"def total_{kind}_{field}(moves, minimum={limit}):",
            f'    """The {field} of every {kind} move of at least {limit}, times {factor}."""',
            "    total = 0",
            "    for move in moves:",
            f'        if move.kind == "{kind}" and move.{field} >= minimum:',
            f"            total += move.{field} * {factor}",
            "    return total",
            "",
        ]
    lines += ["", "REPORT = {"]
    lines += [f'    "{kind}": total_{kind}_{fields[i % len(fields)]},' for i, kind in enumerate(kinds[:n_kinds])]
    lines += ["}", "", "", "def nightly_report(moves):", '    """Every counter of REPORT over the day\'s moves."""',
              "    return {"]
    return "\n".join(lines)


# Long context (golden/README.md, "Row-subset taps"): > 1,024 positions with the continuation, so that
# bugs that only show past 64, 80 or 512 positions (a sliding window, a KV-length limit) have rows to show in.
_LONG = {"id": "long", "chat": False, "text": long_code()}

PROMPTS: dict[str, list[dict[str, Any]]] = {
    "qwen2.5-coder-0.5b": [_HAIKU, _CODE, _MULTITURN, _LONG],
    "smollm2-135m": [_HAIKU, _CODE, _MULTITURN, _LONG],
    "tiny-qwen2": [_HAIKU, _FOX],
    "tiny-llama": [_HAIKU, _FOX],
}


class ChatTemplateMissing(ValueError):
    pass


def chat_info(model_path: Path) -> tuple[str, str, str]:
    """(chat template, bos token text, eos token text) of a GGUF file; '' for a missing bos/eos."""
    from gguf import GGUFReader

    reader = GGUFReader(str(model_path))
    fields = reader.fields
    if "tokenizer.chat_template" not in fields:
        raise ChatTemplateMissing(f"{model_path}: no tokenizer.chat_template in the GGUF metadata")
    template = fields["tokenizer.chat_template"].contents()
    tokens = fields["tokenizer.ggml.tokens"]

    def text_of(key: str) -> str:
        if key not in fields:
            return ""
        tid = int(fields[key].contents())
        # contents(index) reads one element of the array without decoding all 150k strings.
        return tokens.contents(tid) if tid < len(tokens.data) else ""

    return template, text_of("tokenizer.ggml.bos_token_id"), text_of("tokenizer.ggml.eos_token_id")


def render_messages(template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
                    bos_token: str, eos_token: str) -> str:
    """One rendering with llama-cpp-python's Jinja2ChatFormatter."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(template=template, eos_token=eos_token, bos_token=bos_token,
                              add_generation_prompt=add_generation_prompt)
    return fmt(messages=messages).prompt


def render(model_path: Path, prompt: dict[str, Any]) -> str:
    """The text the model is fed for `prompt`: the chat template applied (add_generation_prompt=True)
    for a chat prompt, the text itself otherwise."""
    if not prompt["chat"]:
        return prompt["text"]
    template, bos, eos = chat_info(Path(model_path))
    return render_messages(template, prompt["messages"], True, bos, eos)
