"""Training-data throughput (samples/s of 128x128 paired crops) of the Ray Data pipeline against plain WebDataset +
torch DataLoader on the same shards and CPUs, and their ratio.

Launch (defaults: data/bench, built first if missing; 2 CPUs; 1 warm-up + 5 interleaved timed passes per side)::

    python jobs/benchmark_data.py

More CPUs, more passes, JSON::

    python jobs/benchmark_data.py cpus=8 passes=5 json_out=runs/bench/data.json

Options are ``key=value`` overrides (or a YAML file first); ``--help`` lists them.
Logic: datprl.platform.bench.data.
"""

import sys

if __name__ == "__main__":
    from datprl.platform.bench.data import main

    raise SystemExit(main(sys.argv[1:]))
