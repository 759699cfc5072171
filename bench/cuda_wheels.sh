#!/usr/bin/env bash
# The wheels bench/cuda.py needs on the workplace's GPU machines, into .whl/ (ignored by git; 16 MB). Those
# machines have no package index, Python 3.12, their own torch, numpy 2, safetensors, einops, pillow, pyyaml,
# regex, tqdm, requests and sentencepiece; they lack ldm (stable-diffusion-sdkit), omegaconf, ftfy and the CLIP
# BPE file (open-clip-torch's, found, not imported), and their transformers is 5.x, whose CLIPTextModel has no
# `text_model` (the path of the webui's checkpoint keys and kohya's names). transformers 4.30, the webui's, needs
# a tokenizers < 0.14 that has no Python 3.12 wheel; 4.44 with tokenizers 0.19 passes our training, loading,
# memory and SDXL tests as 4.30 does (numpy 2.2 too). PYTHON_VERSION (default 3.12) picks the wheels' Python:
# 3.11 rehearses the device's command here, in a venv holding only what those machines hold.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON_VERSION:-3.12}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$py" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  transformers==4.44.2 tokenizers==0.19.1 huggingface_hub==0.24.7 stable-diffusion-sdkit==2.1.5 \
  omegaconf==2.4.0 ftfy==6.3.1 wcwidth==0.9.5 open-clip-torch==2.20.0
ls .whl
