"""Every GPU check in one run (model, serving, training, data-loader starvation, multi-GPU), within about 8 minutes:
``OUT_DIR/gpu-check.json`` and the Markdown summary ``OUT_DIR/gpu-check.md``.

Launch (normally through ``bash infra/gpu-check.sh OUT_DIR``)::

    python jobs/gpu_check.py out_dir=runs/gpu-check
    python jobs/gpu_check.py out_dir=runs/gpu-check steps=[model,serving] model.channels_last=[false,true]
    python jobs/gpu_check.py infra/gpu-check-cpu.yaml out_dir=/tmp/gpu-check   # the CPU test mode

Without a CUDA device (and without ``device=cpu``) it exits with status 3 and a one-line message. Options are
``key=value`` overrides (or a YAML file first); ``--help`` lists them. Logic: datprl.platform.bench.gpu_check.
"""

import sys

if __name__ == "__main__":
    from datprl.platform.bench.gpu_check import main

    raise SystemExit(main(sys.argv[1:]))
