# shellcheck shell=bash
# Sourced on the lent GPU machine, in the repository's root, before anything of the project runs there (what
# infra/gpu-check-device.sh does; infra/gpu-check-device.md):
#
#   . infra/gpu-device-env.sh && python3 -m pytest tests/test_train.py -k cuda
#
# That machine's python3 (3.12) has torch and much of what the project needs, and no network: what is missing travels
# in .gpu/ (filled here by infra/gpu-wheels.sh). This installs .gpu/whl/*.whl into $GPU_SITE (/tmp/site); makes the
# project importable as `datprl` there without installing it: a folder of links mapping the repository's folders onto
# the namespace as pyproject.toml's package-dir does (no setuptools, nothing written into that python's environment);
# exports PYTHONPATH (the check's steps, Ray's workers and jobs/train.py inherit it); unpacks .gpu/data.tar.xz to
# data/gpu-check; prints the versions that matter and imports what the check needs. Returns non-zero when that fails.
gpu_site=${GPU_SITE:-/tmp/site}
gpu_python=${GPU_PYTHON:-python3}
gpu_ok=1
if [ ! -d .gpu/whl ] || [ ! -f infra/gpu-check.sh ]; then
  echo "[gpu-env] error: run from the repository's root with .gpu carried (infra/gpu-wheels.sh fills it)" >&2
  gpu_ok=0
elif ! "$gpu_python" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$gpu_site" .gpu/whl/*.whl; then
  echo "[gpu-env] error: pip could not install .gpu/whl/*.whl" >&2
  gpu_ok=0
fi
if [ "$gpu_ok" = 1 ]; then
  mkdir -p "$gpu_site/datprl"
  for gpu_dir in platform models priors serve; do
    ln -sfn "$PWD/$gpu_dir" "$gpu_site/datprl/$gpu_dir"
  done
  export PYTHONPATH=$gpu_site${PYTHONPATH:+:$PYTHONPATH}
  if [ -f .gpu/data.tar.xz ] && [ ! -f data/gpu-check/manifest.json ]; then
    mkdir -p data && tar -C data -xJf .gpu/data.tar.xz && echo "[gpu-env] corpus unpacked: data/gpu-check"
  fi
  gpu_ray=0
  if compgen -G ".gpu/whl/ray-*.whl" >/dev/null; then gpu_ray=1; fi  # without it: the model and serving steps only
  "$gpu_python" - "$gpu_ray" <<'EOF' || gpu_ok=0
import sys
from importlib import metadata

names = ["torch", "numpy", "pandas", "pyarrow", "pillow", "scipy", "scikit-image", "safetensors", "pyyaml", "tqdm",
         "aiohttp", "grpcio", "protobuf", "packaging", "typing-extensions", "pydantic", "ray"]
versions = []
for name in names:
    try:
        versions.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        versions.append(f"{name} -")
print(f"[gpu-env] python {sys.version.split()[0]} ({sys.executable}): " + ", ".join(versions))
import torch  # noqa: E402

import datprl.platform.bench.gpu_check  # noqa: E402
import datprl.platform.bench.gpu_steps  # noqa: E402,F401

where = datprl.platform.bench.gpu_check.__file__
print(f"[gpu-env] datprl: {where}; torch sees {torch.cuda.device_count()} CUDA device(s)")
if sys.argv[1] == "1":
    import ray.dashboard.optional_deps  # noqa: F401  include_dashboard=True (Ray Train's jobs) needs these
    import ray.data  # noqa: F401
    import ray.train.torch  # noqa: F401
else:
    print("[gpu-env] no Ray wheel carried: only the model and serving steps can run (steps=[model,serving])")
EOF
  [ "$gpu_ok" = 1 ] || echo "[gpu-env] error: the imports above failed" >&2
fi
unset gpu_dir gpu_ray gpu_python
[ "$gpu_ok" = 1 ]
