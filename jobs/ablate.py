"""The paper's ablation at equal budget: every arm (no pools, task pool only, both pools without and with the
description priors) x every seed, trained with one recipe and evaluated on the cross-source test split.

    python jobs/ablate.py infra/ablate-local.yaml              # the four arms x seeds 0, 1, 2 (see that file)
    python jobs/ablate.py --dry-run seeds=[0] train.steps=200  # print the resolved config and its runs, start nothing
    python jobs/ablate.py --help                               # every field

Writes <output_dir>/ablation.md, ablation.csv, ablation.png; the same command resumes an interrupted ablation.
"""

import sys

if __name__ == "__main__":
    from datprl.platform.train.ablation import main

    raise SystemExit(main(sys.argv[1:]))
