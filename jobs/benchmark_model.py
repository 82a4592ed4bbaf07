"""Forward+backward throughput (images/s) of the ``paper`` variant against the ``restormer`` backbone, and their ratio.

Launch (CPU defaults: batch 2, 64x64, fp32, 2 warm-up steps, 5 interleaved rounds)::

    python jobs/benchmark_model.py

GPU check::

    python jobs/benchmark_model.py device=cuda dtypes=[fp32,bf16] batch=8 size=128

Options are ``key=value`` overrides (or a YAML file first); ``--help`` lists them. Logic: datprl.platform.bench.model.
"""

import sys

if __name__ == "__main__":
    from datprl.platform.bench.model import main

    raise SystemExit(main(sys.argv[1:]))
