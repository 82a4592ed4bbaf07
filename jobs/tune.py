"""Sweep the prompt pools' sizes and top-k (optionally prompt dimension and learning rate) on Ray Tune: Optuna TPE
with ASHA early stopping, every trial a Ray Train run of the training job.

    python jobs/tune.py infra/tune-smoke.yaml                 # 2 CPUs, a few minutes (see that file)
    python jobs/tune.py --dry-run search.num_samples=4        # print the resolved config, start nothing
    ray job submit --working-dir . -- python jobs/tune.py infra/tune-cluster.yaml
    python jobs/tune.py --help                                # every field

Writes <output_dir>/tune.md, tune.csv, tune.png, best.yaml, study.db; the same command resumes an interrupted sweep.
"""

import sys

if __name__ == "__main__":
    from datprl.platform.tune.sweep import main

    raise SystemExit(main(sys.argv[1:]))
