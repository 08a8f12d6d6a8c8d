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

PROMPTS: dict[str, list[dict[str, Any]]] = {
    "qwen2.5-coder-0.5b": [_HAIKU, _CODE, _MULTITURN],
    "smollm2-135m": [_HAIKU, _CODE, _MULTITURN],
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
