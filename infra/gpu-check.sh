#!/usr/bin/env bash
# Every GPU check in one run, for a GPU lent for a few minutes: bash infra/gpu-check.sh OUT_DIR [config.yaml]
# [key=value ...]. Writes OUT_DIR/gpu-check.json and OUT_DIR/gpu-check.md (the summary that
# docs/benchmarks.md, "GPU", is filled in from) and each step's log under OUT_DIR/steps/. Fits about 8 minutes
# (total_budget_s); each step runs in a
# process of its own within its budget, and one that fails or runs out of time is reported while the others run.
# Exit status: 0 every step ran (ok or skipped), 1 a step failed, 2 a bad option, 3 no CUDA device (a one-line message,
# within seconds: nothing else is started). The CPU test mode: bash infra/gpu-check.sh OUT infra/gpu-check-cpu.yaml
# On a GPU lent through the device tool (no network there): infra/gpu-check-device.md (infra/gpu-check-device.sh).
set -euo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ] || [ "${1#*=}" != "$1" ]; then
  echo "usage: bash infra/gpu-check.sh OUT_DIR [config.yaml] [key=value ...]" >&2
  exit 2
fi
case $1 in
  /*) out=$1 ;;
  *) out=$PWD/$1 ;;  # relative to where it was called from, not the repository root it runs in
esac
shift
cd "$(dirname "$0")/.."
python=.venv/bin/python
if [ ! -x "$python" ]; then
  python=python3  # no virtual environment: whatever python3 is on PATH must then have the project installed
fi
if ! "$python" -c "import datprl.platform.config" 2>/dev/null; then
  echo "gpu-check: error: $python cannot import the project (datprl): run \`bash infra/setup.sh\` first" >&2
  exit 2
fi
exec "$python" jobs/gpu_check.py "$@" "out_dir=$out"
