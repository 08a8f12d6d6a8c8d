#!/usr/bin/env bash
# HF transformers vs llama.cpp: run the adapter on each model's exact goldens and judge the dumps with
# `lockstep compare`. Usage: python/scripts/hf-vs-llamacpp.sh OUT_DIR [model/tier/prompt ...]
# Needs: a Python with './python[hf]' installed ($PYTHON, default python3), target/release/lockstep
# ($LOCKSTEP_BIN), and the real models in the cache (`lockstep fetch`; $LOCKSTEP_CACHE or ~/.cache/lockstep).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$(realpath -m "${1:?usage: $0 OUT_DIR [ENTRY ...]}"); shift
PYTHON=${PYTHON:-python3}
BIN=${LOCKSTEP_BIN:-target/release/lockstep}
CACHE=${LOCKSTEP_CACHE:-$HOME/.cache/lockstep}
entries=("$@")
[ ${#entries[@]} -gt 0 ] || entries=(tiny-qwen2/exact/fox tiny-qwen2/exact/haiku tiny-llama/exact/fox
  tiny-llama/exact/haiku qwen2.5-coder-0.5b/exact/code qwen2.5-coder-0.5b/exact/haiku
  smollm2-135m/exact/code smollm2-135m/exact/haiku)
mkdir -p "$out"
for e in "${entries[@]}"; do
  model=${e%%/*}
  case $model in
    tiny-*) gguf=golden/models/$model.q.gguf ;;  # the exact tier dequantizes the .q.gguf (manifest: model_file)
    *) gguf=$CACHE/models/$model.gguf ;;
  esac
  gguf=$(realpath "$gguf")
  name=${e//\//_}
  echo "== $e ($gguf)"
  start=$(date +%s)
  (cd python && "$PYTHON" -m lockstep_kit.hf --gguf "$gguf" --golden "../golden/taps/$e.safetensors" \
      --out "$out/$name.safetensors") 2>&1 | grep -v 'it/s\]' | tee "$out/$name.adapter.log"
  (cd python && "$PYTHON" -m lockstep_kit.diff "$out/$name.safetensors" "../golden/taps/$e.safetensors" \
      --top 8 --limit 1e-5) > "$out/$name.diff.txt"
  set +e
  "$BIN" compare --dump "$out/$name.safetensors" --golden "$e" --report "$out/$name" | tee "$out/$name.compare.txt"
  set -e
  echo "   ($(( $(date +%s) - start )) s)"
done
