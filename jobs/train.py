"""Train DATPRL-IR on Ray Train, export the weights, evaluate, print the per-task table.

python jobs/train.py                                     # embedded default: local Ray, default corpus, paper_tiny
python jobs/train.py steps=2000 model.variant=paper data.crop_size=128
python jobs/train.py --dry-run model.task_pool.top_k=4     # print the resolved config, start nothing
ray job submit --working-dir . -- python jobs/train.py infra/train-cluster.yaml
"""

import sys

if __name__ == "__main__":
    from datprl.platform.train.fit import main

    raise SystemExit(main(sys.argv[1:]))
