"""Training samples/s of today's main-job recipe against the first release's recipe, and what each part of today's
recipe costs per step (the per-task loss division, the priors, periodic validation, the fixed domain keys), all arms
interleaved in one process on the same batches.

Launch (defaults: data/default, built first if missing; the arms of datprl.platform.bench.recipes.ARMS; 3 warm-up +
40 timed steps per arm in turns of 5; 2 timed validations per validating arm; several minutes on 2 idle cores)::

    python jobs/benchmark_recipes.py
    python jobs/benchmark_recipes.py steps=100 validations=3 json_out=runs/bench/recipes.json
    python jobs/benchmark_recipes.py 'arms={today: [], lr_half: [optim.lr=1e-3]}' baseline=today

Options are ``key=value`` overrides (or a YAML file first); ``--help`` lists them.
Logic: datprl.platform.bench.recipes.
"""

import sys

if __name__ == "__main__":
    from datprl.platform.bench.recipes import main

    raise SystemExit(main(sys.argv[1:]))
