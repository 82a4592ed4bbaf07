#!/usr/bin/env bash
# The GPU check on a lent GPU machine, in one call of the device tool (the recipe: infra/gpu-check-device.md):
#
#   bash infra/gpu-check-device.sh "$OUT" [config.yaml] [key=value ...]   # carry: [".gpu"] (infra/gpu-wheels.sh)
#
# Sets that machine up (infra/gpu-device-env.sh: the carried wheels, the project importable, the carried corpus in
# data/gpu-check), runs `bash infra/gpu-check.sh` on that corpus (within its total_budget_s, 460 s by default; a config
# file and key=value options given here go to it) and leaves in OUT what the tool brings back (at most 8 files):
# env.log (versions, GPU, CPUs, memory, /dev/shm), console.log, gpu-check.json, gpu-check.md, config.yaml, steps.tar.gz
# (each step's log and result) and ray-logs.tar.gz (Ray's session logs). Exit status: the check's (0 every step ran,
# 1 a step failed, 3 no CUDA device), 2 when setting up failed (env.log says why).
set -uo pipefail
if [ $# -lt 1 ] || [ "${1#*=}" != "$1" ]; then
  echo "usage: bash infra/gpu-check-device.sh OUT [config.yaml] [key=value ...]" >&2
  exit 2
fi
out=$1
shift
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1
work=${GPU_CHECK_DIR:-/tmp/gpu-check}
mkdir -p "$out"
start=$(date +%s)
# shellcheck source=infra/gpu-device-env.sh
if ! . infra/gpu-device-env.sh >"$out/env.log" 2>&1; then
  cat "$out/env.log"
  exit 2
fi
{
  # what the numbers depend on: the GPU, the CPUs, memory and Ray's object store (/dev/shm, else /tmp: slower)
  nvidia-smi -L 2>&1 | head -4
  echo "$(nproc) CPUs; $(free -g | awk '/^Mem:/ {print $2 " GiB memory, " $7 " GiB available"}')"
  df -h /dev/shm /tmp 2>&1 | awk 'NR > 1 {print $6 ": " $4 " free of " $2}'
} >>"$out/env.log" 2>&1
cat "$out/env.log"
echo "[gpu-check-device] set up in $(($(date +%s) - start)) s; the check writes to $work"
config=()
if [ $# -gt 0 ] && [ "${1%.yaml}" != "$1" ]; then  # a config file goes first (infra/gpu-check-cpu.yaml: the simulation)
  config=("$1")
  shift
fi
bash infra/gpu-check.sh "$work" "${config[@]}" dataset.path=data/gpu-check "$@" 2>&1 | tee "$out/console.log"
code=${PIPESTATUS[0]}
for name in gpu-check.json gpu-check.md config.yaml; do
  [ -f "$work/$name" ] && cp "$work/$name" "$out/"
done
[ -d "$work" ] && tar -C "$work" --exclude=runs --exclude='*.pt' --exclude='*.safetensors' -czf "$out/steps.tar.gz" .
if compgen -G "/tmp/ray/session_2*/logs" >/dev/null; then
  (cd /tmp/ray && tar --exclude='*.sock' -czf "$out/ray-logs.tar.gz" session_2*/logs) 2>/dev/null
fi
echo "[gpu-check-device] exit status $code after $(($(date +%s) - start)) s; in $out: $(cd "$out" && echo *)"
exit "$code"
