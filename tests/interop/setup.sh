#!/usr/bin/env bash
# Build the interop tier's reference environments under FOLDER, outside the repository (each pins its own
# transformers, so none of them may share draftsmith's environment):
#
#   tests/interop/setup.sh FOLDER [speculators] [eagle]      # default: both
#   DRAFTSMITH_INTEROP=FOLDER python -m pytest -m interop tests/interop -q
#
# speculators: speculators==0.9.0 from PyPI with transformers 5.19.0 (torchvision and torchaudio, which its
#   model code never imports, are left out).
# eagle: the environment for SafeAILab's EAGLE reference code (transformers 4.53.1, what its
#   requirements.txt asks for). The code itself is not on PyPI (eagle-llm stops at 1.2.1, before EAGLE-3):
#   clone github.com/SafeAILab/EAGLE and set DRAFTSMITH_EAGLE_REPO=/path/to/EAGLE when running the tier.
# TORCH (default torch==2.13.0) is the torch requirement for both; give a CPU build's spec or index through
# PIP_EXTRA_INDEX_URL where the default index only has CUDA builds.
set -euo pipefail
root=${1:?usage: tests/interop/setup.sh FOLDER [speculators] [eagle]}
shift
envs=("$@")
[ ${#envs[@]} -gt 0 ] || envs=(speculators eagle)
torch_spec=${TORCH:-torch==2.13.0}

venv() {  # venv NAME: a fresh virtual environment with torch; prints nothing else
  python3 -m venv "$root/$1"
  "$root/$1/bin/python" -m pip install -q --upgrade pip
  "$root/$1/bin/python" -m pip install -q "$torch_spec"
}

for name in "${envs[@]}"; do
  case $name in
    speculators)
      venv speculators
      "$root/speculators/bin/python" -m pip install -q --no-deps speculators==0.9.0 hs-connectors==0.9.0
      "$root/speculators/bin/python" -m pip install -q transformers==5.19.0 safetensors huggingface-hub \
        "pydantic>=2" pydantic-settings "loguru>=0.7.2,<=0.7.3" "numpy>=2,<=2.5.4" "tqdm>=4.66.3" \
        "datasets>=4,<=5.1.0" typer rich click protobuf psutil httpx aiohttp "openai>=2"
      "$root/speculators/bin/python" -c "import speculators, transformers; print('speculators env: transformers', transformers.__version__)"
      ;;
    eagle)
      venv eagle
      "$root/eagle/bin/python" -m pip install -q transformers==4.53.1 accelerate==0.26.0 safetensors \
        huggingface-hub sentencepiece protobuf
      "$root/eagle/bin/python" -c "import transformers; print('eagle env: transformers', transformers.__version__)"
      ;;
    *) echo "unknown environment '$name': choose speculators or eagle" >&2; exit 2 ;;
  esac
done
echo "ready: DRAFTSMITH_INTEROP=$root python -m pytest -m interop tests/interop -q"
