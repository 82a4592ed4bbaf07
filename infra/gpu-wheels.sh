#!/usr/bin/env bash
# Fill .gpu/, what a lent GPU session carries to the device machine for the GPU check (infra/gpu-check-device.md):
# run it HERE, where the package registry is, once before such a session: bash infra/gpu-wheels.sh [--no-data]
#
#   .gpu/whl/*.whl       the cp312 manylinux wheels the check needs there beyond what that machine's image has (its
#                        python3 is 3.12 with torch, numpy, pandas, pyarrow, aiohttp, grpcio, ... but no pydantic and
#                        no Ray), one version of each: the versions of this project's .venv (what the tests ran with)
#   .gpu/data.tar.xz     a small pre-built corpus with its domain priors (the default corpus needs the 130 MB package
#                        cache, which cannot travel), unpacked there to data/gpu-check
#
# and prints their sizes against the 64 MiB that one call may carry (the working tree included). Nothing can be fetched
# on that machine, so everything the steps import must be here. Ray's wheel (79 MB) is too big as it is: it is repacked
# (cached) without its Java jars (ray/jars, 33 MB packed: cross-language workers), RLlib and the dashboard's source
# maps, its three native binaries stripped of their symbol tables (strip --strip-unneeded: the code and its dynamic
# symbols stay), LZMA-compressed (pip reads any zip method): about 29 MB. With it all steps run in one call.
#
# Idempotent: downloads and the repacked Ray are cached under ~/.cache/datprl/gpu-wheels; the corpus is rebuilt only
# when .gpu/data.tar.xz is missing (rm it to rebuild; building starts a local Ray for the describer). Options
# (environment): GPU_PYTHON_VERSION (3.12: the device's; the simulation here uses 3.11), GPU_CARRY_DIR (.gpu),
# GPU_DATA_ARGS (the corpus's jobs/build_dataset.py overrides, below). Exit status 1 when the carry is over budget.
set -euo pipefail
cd "$(dirname "$0")/.."

data=1
case "${1:-}" in
  --no-data) data=0 ;;
  "") ;;
  *) echo "usage: bash infra/gpu-wheels.sh [--no-data]" >&2; exit 2 ;;
esac
pyver=${GPU_PYTHON_VERSION:-3.12}
carry=${GPU_CARRY_DIR:-.gpu}
# 128 px tiles (the GPU recipe's crop), 4 per source, one source per group: 420 samples (322 for training), a pass of
# 30 steps of the recipe's batch (the default corpus: 256 px tiles, 68 steps), 12 MB packed with its priors.
data_args=${GPU_DATA_ARGS:-tile=128 max_tiles_per_source=4 max_sources_per_group=1 contact_sheet=false}
python=.venv/bin/python
[ -x "$python" ] || python=python3
budget=$((64 * 1024 * 1024))

# What the steps import there beyond the image (its package list comes with the device tool's notes, for a
# session that has it; tests/test_gpu_device.py keeps the model and serving steps free of Ray, webdataset and s3fs).
# model, serving and the check itself: the configs are pydantic models (pydantic 2.14 wants typing-extensions >= 4.16,
# newer than the image may have).
base=(pydantic pydantic-core annotated-types typing-inspection typing-extensions)
# dataset, training, starvation, multi_gpu: Ray; protobuf (opentelemetry-proto needs >= 5: the tested version, whatever
# the image's); jsonschema (runtime environments); what Ray's dashboard imports (ray/dashboard/optional_deps.py): Ray
# Train's jobs start Ray with include_dashboard=True, which Ray refuses without them. opencensus's google-api-core,
# colorful and smart-open are left out: nothing the check runs imports them (simulated without them: Ray's logs showed
# no import error).
ray=(ray protobuf jsonschema jsonschema-specifications referencing rpds-py aiohttp-cors opencensus opencensus-context
     opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-exporter-prometheus
     opentelemetry-semantic-conventions)

names=("${base[@]}" "${ray[@]}")
mapfile -t pins < <("$python" - "${names[@]}" <<'EOF'
import sys
from importlib import metadata

missing = []
for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"[gpu-wheels] error: not installed here, so no version to carry: {' '.join(missing)}")
EOF
)
[ ${#pins[@]} -eq ${#names[@]} ] || exit 1  # the error is above

tag=cp${pyver/./}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/datprl/gpu-wheels/$tag
mkdir -p "$cache/slim"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
echo "[gpu-wheels] downloading ${#pins[@]} wheels for CPython $pyver (cached in $cache)"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  "${platforms[@]}" -d "$cache" "${pins[@]}" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }

rm -rf "$carry/whl"
mkdir -p "$carry/whl"
for pin in "${pins[@]}"; do
  name=${pin%%==*} version=${pin#*==}
  stem=$(echo "$name" | tr 'A-Z.-' 'a-z__')  # a wheel's file name: the normalised name, underscores
  found=()
  for f in "$cache"/*.whl; do
    base_name=$(basename "$f")
    normal=$(echo "${base_name%%-*}" | tr 'A-Z.-' 'a-z__')
    rest=${base_name#*-}
    [ "$normal" = "$stem" ] && [ "${rest%%-*}" = "$version" ] && found+=("$f")
  done
  if [ ${#found[@]} -ne 1 ]; then
    echo "[gpu-wheels] error: expected one wheel of $pin in $cache, found ${#found[@]}" >&2
    exit 1
  fi
  wheel=${found[0]}
  if [ "$name" = ray ]; then
    slim=$cache/slim/$(basename "$wheel")
    if [ ! -f "$slim" ]; then
      echo "[gpu-wheels] repacking $(basename "$wheel") (no jars, RLlib or source maps; stripped; LZMA): a few minutes"
      python3 - "$wheel" "$slim.part" <<'EOF'
import os
import subprocess
import sys
import tempfile
import zipfile

source, target = sys.argv[1], sys.argv[2]
DROP = ("ray/jars/", "ray/rllib/")
STRIP = ("ray/_raylet.so", "ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet")


def dropped(name: str) -> bool:
    return name.startswith(DROP) or (name.startswith("ray/dashboard/client/build/") and name.endswith(".map"))


with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
    for info in zin.infolist():
        if dropped(info.filename):
            continue
        data = zin.read(info)
        if info.filename in STRIP:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "binary")
                with open(path, "wb") as f:
                    f.write(data)
                subprocess.run(["strip", "--strip-unneeded", path], check=True)
                with open(path, "rb") as f:
                    data = f.read()
        elif info.filename.endswith(".dist-info/RECORD"):  # no entries for the files left out, no hash for the stripped
            entries = []
            for line in data.decode().splitlines(keepends=True):
                path = line.split(",")[0]
                if not dropped(path):
                    entries.append(f"{path},,\n" if path in STRIP else line)
            data = "".join(entries).encode()
        out = zipfile.ZipInfo(info.filename, info.date_time)
        out.external_attr = info.external_attr
        out.compress_type = zipfile.ZIP_LZMA
        zout.writestr(out, data)
EOF
      mv "$slim.part" "$slim"
    fi
    wheel=$slim
  fi
  cp "$wheel" "$carry/whl/"
done

if [ "$data" = 1 ] && [ ! -f "$carry/data.tar.xz" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "[gpu-wheels] building the corpus the device trains on ($data_args) and its domain priors"
  # shellcheck disable=SC2086  # data_args is a list of key=value words
  "$python" jobs/build_dataset.py "output=$tmp/gpu-check" $data_args
  "$python" jobs/describe.py "dataset=$tmp/gpu-check" "output=$tmp/gpu-check/priors"
  tar -C "$tmp" -cf - gpu-check | xz -T0 -6 > "$carry/data.tar.xz.part"
  mv "$carry/data.tar.xz.part" "$carry/data.tar.xz"
fi

# The budget: what travels in a call is the working tree (tracked and untracked files git does not ignore) plus what
# carry names.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null \
  | awk '{s += $1} END {print s + 0}')
wheels=$(find "$carry/whl" -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
corpus=$(stat -c %s "$carry/data.tar.xz" 2>/dev/null || echo 0)
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "[gpu-wheels] $carry/whl:"
find "$carry/whl" -name '*.whl' -printf '%s %f\n' | sort -nr | while read -r size file; do
  printf '  %10s  %s\n' "$(mib "$size")" "$file"
done
total=$((tree + wheels + corpus))
echo "[gpu-wheels] wheels $(mib "$wheels"), corpus $(mib "$corpus"), working tree $(mib "$tree"):" \
  "$(mib "$total") of the $(mib "$budget") one call carries ($(mib $((budget - total))) left)"
if [ "$total" -gt "$budget" ]; then
  echo "[gpu-wheels] error: over the budget: carry less (GPU_DATA_ARGS for a smaller corpus)" >&2
  exit 1
fi
