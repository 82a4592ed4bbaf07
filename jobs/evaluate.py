"""Evaluate a restoration network on dataset splits: PSNR/SSIM of input and output per (domain, task), the mean over
tasks (the paper's headline), comparison grids and prompt-usage heatmaps per split in <out_dir>/<split>/, and a table
comparing the splits side by side (printed, and saved as <out_dir>/summary.md).

    python jobs/evaluate.py                  # the weights `python jobs/train.py` exported, val and test of data/default
    python jobs/evaluate.py weights=w.safetensors splits=[test] data.eval_crop=128 out_dir=outputs/eval-test
    python jobs/evaluate.py weights=w.safetensors tasks=[haze,cloud] zero_shot_tasks=[haze]   # held-out tasks
    python jobs/evaluate.py variant=paper_tiny data.dataset=data/default                   # smoke run, untrained
    python jobs/evaluate.py weights=w.safetensors y_channel=true crop_border=4       # single-task convention
    RAY_ADDRESS=auto python jobs/evaluate.py weights=w.safetensors data.dataset=s3://bucket/prefix
    python jobs/evaluate.py --help                                                      # every field
"""

import sys

if __name__ == "__main__":
    from datprl.platform.evaluation.evaluate import main

    raise SystemExit(main(sys.argv[1:]))
