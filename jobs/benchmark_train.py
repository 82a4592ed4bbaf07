"""Training steps/s of the Ray Train loop (1 worker, Ray Data ingest, reports) against a bare single-process PyTorch
loop on the same model, batches and torch threads, and their ratio (target: ray_train/bare >= 0.90 on CPU).

Launch (defaults: data/default, built first if missing; paper_tiny, crop 64, 1 sample per task; 2 torch threads per
side; a local Ray with 2 CPUs, the worker on 1; 10 warm-up + 40 timed steps per side, a Ray report every 10 steps;
2 interleaved rounds; a few minutes on 2 idle cores)::

    python jobs/benchmark_train.py

Other settings, JSON::

    python jobs/benchmark_train.py crop_size=128 steps=100 rounds=3 json_out=runs/bench/train.json

On a GPU (both sides on it; the GPU recipe's network, crops and batch)::

    python jobs/benchmark_train.py device=cuda variant=paper crop_size=128 per_task_batch=2 cpus=16 cpus_per_worker=4

Options are ``key=value`` overrides (or a YAML file first); ``--help`` lists them.
Logic: datprl.platform.bench.train.
"""

import sys

if __name__ == "__main__":
    from datprl.platform.bench.train import main

    raise SystemExit(main(sys.argv[1:]))
