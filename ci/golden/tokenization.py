"""Tokenization goldens: what llama.cpp's tokenizer makes of a fixed list of strings.

For each real model, `golden/tokenize/{model}.json` holds
- `cases`: [{text, ids, detok}] with ids = llama_tokenize(vocab, text, add_special=True,
  parse_special=True) and detok = llama_detokenize(vocab, ids, remove_special=False,
  unparse_special=True) decoded as UTF-8 (invalid bytes replaced by U+FFFD);
- `vocab`: n_vocab, bos, eos (null when the model has none) and `eog`, every id for which
  llama_vocab_is_eog is true;
- `chat`: [{messages, add_generation_prompt, rendered}], the model's chat template rendered by
  llama-cpp-python's Jinja2ChatFormatter (see prompts.py).

The model is loaded with vocab_only=True: no weights are read. Run directly to write into a folder:
`python ci/golden/tokenization.py OUT_DIR` (models from the lockstep cache).
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prompts  # noqa: E402

REAL_MODELS = ("qwen2.5-coder-0.5b", "smollm2-135m")

# llama_token_attr bits (llama.h)
_ATTR_CONTROL = 1 << 3
_ATTR_USER_DEFINED = 1 << 4

# Strings every model is tested on; the special tokens of each vocabulary and the rendered chat
# prompts are added per model (see `cases_for`).
COMMON_STRINGS: list[str] = [
    # empty and whitespace
    "", " ", "  ", "   ", "\t", "\n", "\n\n", "\n\n\n", "\r\n", " \n", "\n ", "\t\t\tx", "a\tb",
    "    indented four", "        eight spaces", "trailing spaces   ", "   leading spaces",
    "line one\nline two\n\nline four", "windows\r\nline\r\nendings", "mixed \t \n \r\n whitespace",
    " " * 17 + "x", "x" + " " * 33,
    # plain English
    "Hello", "Hello world", " Hello world", "Hello, world!", "The quick brown fox jumps over the lazy dog.",
    "I'm sure you'll see they've done it, haven't they? It's John's.", "I'M SURE YOU'LL SEE THEY'VE DONE IT",
    "Don't stop believing!!! ...really?!", "e-mail: someone@example.com, url: https://example.org/a?b=c&d=e",
    "A sentence with \"double\" and 'single' quotes.", "CamelCaseIdentifier and snake_case_identifier",
    "Mr. Smith paid $1,234.56 on 2024-03-15 at 10:30am (UTC+2).",
    # digits
    "0", "7", "42", "123", "1234", "12345", "3.14159265358979323846", "1234567890123456789012345678901234567890",
    "-273.15", "1e-9", "0xDEADBEEF", "v1.2.3-rc4", "x1y22z333", "2^63-1 = 9223372036854775807",
    # code
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "fn main() {\n\tprintln!(\"{}\", 1 + 2);\n}\n",
    "#include <stdio.h>\nint main(void) { return printf(\"%d\\n\", argc); }",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * c[i]; }",
    "const x = (a, b) => a ?? b; // nullish\n/* block */",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "<div class=\"main\"><p>Hi &amp; bye</p></div>",
    "{\"key\": [1, 2.5, null, true], \"nested\": {\"a\": \"b\"}}",
    "    return self._cache[key]  # type: ignore[index]",
    "$ ls -la | grep '^d' > /tmp/out.txt 2>&1",
    "```python\nprint('hi')\n```",
    "!!!???...,,,;;;:::", "----====____****####", "a+=b-=c*=d/=e%=f",
    # CJK and other scripts
    "你好，世界！", "我爱自然语言处理。", "日本語のテキストです。カタカナも。", "한국어 텍스트입니다.",
    "Привет, мир! Как дела?", "Γειά σου Κόσμε", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก",
    "Tiếng Việt có dấu", "Ünïcödé çhàrâctérs ñ ß ø å æ œ",
    # emoji
    "😀", "😀😃😄", "Hello 👋 world 🌍!", "👨‍👩‍👧‍👦 family", "🇫🇷🇮🇹 flags", "❤️ ✔️ ☺", "🤖🚀💻🔥",
    # combining marks and unusual code points
    "e\u0301 (e + combining acute)", "n\u0303a\u0308o\u0302", "Z\u0351\u0347a\u0364\u0339l\u0308g\u0310o",
    "zero\u200bwidth\u200cjoiners\u200d", "non\u00a0breaking\u2009thin\u3000ideographic", "soft\u00adhyphen",
    "\u00bd \u2155 \u00b2 \u2160 \u0663", "\ufeffBOM at start", "tab\u000bvt\u000cff",
    "private \ue000 use", "\U0001d400\U0001d401 math bold", "replacement \ufffd char",
    # mixed scripts
    "The word 猫 means cat, and 犬 means dog.", "Москва is the capital of Россия 🇷🇺.",
    "mixing العربية and English and 中文 and 123", "数字123和字母abc混合",
    "コード: print('こんにちは')  # 挨拶",
    # things that look like special tokens but are not
    "<|im_start", "im_start|>", "<| im_start |>", "<|IM_START|>", "<<|im_start|>>", "<|im_start|><|im_start|>",
    "<|endoftext|> and <|endoftext|>", "<s> </s> [INST] [/INST]",
    "<|im_start|im_end|>", "<|im_end|>>", "<<|im_end|>", "<|im_start|>\n<|im_end|>\n\n",
    # edges of the pre-tokenizer regexes
    "next\u0085line", "line\u2028sep\u2029par", "unassigned \u0378\u0379 code points", "tag \U000e0041 char",
    "nul \x00 and \x01\x02 and del \x7f", " \n \n  x", "\r\r\n\n  \t", "x \n\n\ny", "  \u3000 x",
    "DON'T WE'LL I'D YOU'RE IT'S", "'s 't 're 've 'm 'll 'd", "a'b'c''''d", "rock 'n' roll", "'",
    "abc123def456", "\u0661\u0662\u0663 \u0967\u0968 \u2460\u2461 \u216b", "3rd 21st 1000000th",
    "\t\tdef f(x):\n\t\t\treturn x  # tabs\n    \tmixed", "a  b   c    d     e",
    "word\n\n\n\n\nword", "!!!\n\n", "...\r\n", "?!\n \n",
    "The quick brown fox jumps over the lazy dog. " * 40,
    "日本語" * 50,
]


def _load_vocab(model_path: Path):
    import llama_cpp as lc

    lc.llama_backend_init()
    params = lc.llama_model_default_params()
    params.vocab_only = True
    model = lc.llama_model_load_from_file(str(model_path).encode(), params)
    if not model:
        raise RuntimeError(f"{model_path}: llama.cpp could not load the vocabulary")
    vocab = lc.llama_model_get_vocab(model)
    return lc, model, vocab


def _tokenize(lc, vocab, text: str) -> list[int]:
    raw = text.encode("utf-8")
    n_max = len(raw) + 8
    buf = (lc.llama_token * n_max)()
    n = lc.llama_tokenize(vocab, raw, len(raw), buf, n_max, True, True)
    if n < 0:
        n_max = -n
        buf = (lc.llama_token * n_max)()
        n = lc.llama_tokenize(vocab, raw, len(raw), buf, n_max, True, True)
    if n < 0:
        raise RuntimeError(f"llama_tokenize failed for {text!r}")
    return [int(buf[i]) for i in range(n)]


def _detokenize(lc, vocab, ids: list[int]) -> str:
    arr = (lc.llama_token * max(1, len(ids)))(*ids)
    cap = 64 + 32 * len(ids)
    out = ctypes.create_string_buffer(cap)
    n = lc.llama_detokenize(vocab, arr, len(ids), out, cap, False, True)
    if n < 0:
        cap = -n
        out = ctypes.create_string_buffer(cap)
        n = lc.llama_detokenize(vocab, arr, len(ids), out, cap, False, True)
    if n < 0:
        raise RuntimeError(f"llama_detokenize failed for {ids}")
    return out.raw[:n].decode("utf-8", errors="replace")


def _special_tokens(lc, vocab) -> list[tuple[int, str]]:
    """Every CONTROL or USER_DEFINED token as llama.cpp sees it (after its own attribute fix-ups)."""
    out = []
    for tid in range(lc.llama_vocab_n_tokens(vocab)):
        attr = lc.llama_vocab_get_attr(vocab, tid)
        if attr & (_ATTR_CONTROL | _ATTR_USER_DEFINED):
            out.append((tid, lc.llama_vocab_get_text(vocab, tid).decode("utf-8")))
    return out


def chat_cases(model_path: Path, model_id: str) -> list[dict[str, Any]]:
    """The golden prompts' chats plus variants (system message given, no generation prompt)."""
    template, bos, eos = prompts.chat_info(model_path)
    chats = [p["messages"] for p in prompts.PROMPTS.get(model_id, []) if p["chat"]]
    # Without a system message: the templates' default system prompts.
    chats.append([{"role": "user", "content": "Write a haiku about GPU computing"}])
    chats.append([{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "The capital of France is Paris."},
                  {"role": "user", "content": "And of Italy?"}])
    chats.append([{"role": "system", "content": "You are a terse assistant."},
                  {"role": "user", "content": "Say hi in three languages: English, 中文, emoji 👋"}])
    chats.append([{"role": "user", "content": "  leading and trailing spaces  \n"},
                  {"role": "assistant", "content": "ok"}])
    out = []
    for messages in chats:
        for agp in (True, False):
            out.append({"messages": messages, "add_generation_prompt": agp, "bos_token": bos,
                        "eos_token": eos,
                        "rendered": prompts.render_messages(template, messages, agp, bos, eos)})
    return out


def cases_for(specials: list[tuple[int, str]], chats: list[dict[str, Any]]) -> list[str]:
    texts = list(COMMON_STRINGS)
    for _, s in specials:
        texts.append(s)
        texts.append(f"before {s} after")
        texts.append(f"x{s}y{s}\n{s}")
    texts.extend(c["rendered"] for c in chats)
    # all specials in one string, back to back
    texts.append("".join(s for _, s in specials))
    seen, unique = set(), []
    for t in texts:
        if t not in seen:
            seen.add(t)
            unique.append(t)
    return unique


def export_model(model_id: str, model_path: Path) -> dict[str, Any]:
    lc, model, vocab = _load_vocab(model_path)
    try:
        specials = _special_tokens(lc, vocab)
        chats = chat_cases(model_path, model_id)
        cases = []
        for text in cases_for(specials, chats):
            ids = _tokenize(lc, vocab, text)
            cases.append({"text": text, "ids": ids, "detok": _detokenize(lc, vocab, ids)})
        n_vocab = lc.llama_vocab_n_tokens(vocab)
        bos, eos = lc.llama_vocab_bos(vocab), lc.llama_vocab_eos(vocab)
        vocab_info = {
            "n_vocab": n_vocab,
            "bos": bos if bos >= 0 else None,
            "eos": eos if eos >= 0 else None,
            "eog": [t for t in range(n_vocab) if lc.llama_vocab_is_eog(vocab, t)],
            "special": [t for t, _ in specials],
        }
    finally:
        lc.llama_model_free(model)
    return {"model": model_id, "add_special": True, "parse_special": True, "vocab": vocab_info,
            "cases": cases, "chat": chats}


def export(models: dict[str, Path], out_dir: Path) -> list[dict[str, Any]]:
    """Writes out_dir/tokenize/{model}.json for each real model in `models`; returns manifest entries."""
    entries = []
    (out_dir / "tokenize").mkdir(parents=True, exist_ok=True)
    for model_id in REAL_MODELS:
        if model_id not in models:
            continue
        data = export_model(model_id, Path(models[model_id]))
        rel = f"tokenize/{model_id}.json"
        text = json.dumps(data, sort_keys=True, ensure_ascii=False, indent=1) + "\n"
        (out_dir / rel).write_text(text, encoding="utf-8")
        entries.append({"path": rel, "kind": "tokenize", "model": model_id})
    return entries


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: tokenization.py OUT_DIR")
    cache = Path(os.environ.get("LOCKSTEP_CACHE", Path.home() / ".cache" / "lockstep"))
    models = {m: cache / "models" / f"{m}.gguf" for m in REAL_MODELS}
    for m, p in models.items():
        if not p.exists():
            sys.exit(f"{p}: missing; fetch the models first")
    for e in export(models, Path(sys.argv[1])):
        print(e["path"])


if __name__ == "__main__":
    main()
