"""Training-step time of each compute option (precision, channels-last, Adam implementation, torch.compile) against
the default, in one run, interleaved rounds, median per arm and the ratio.

Launch (the main job's setting: paper_tiny, 9 crops of 48x48, 2 threads)::

    python jobs/benchmark_compute.py
    python jobs/benchmark_compute.py arms.compile.compile=true            # adds a torch.compile arm
    python jobs/benchmark_compute.py device=cuda variant=paper batch=18 size=128

Options are ``key=value`` overrides (or a YAML file first); ``--help`` lists them. Logic: datprl.platform.bench.compute.
"""

import sys

if __name__ == "__main__":
    from datprl.platform.bench.compute import main

    raise SystemExit(main(sys.argv[1:]))
