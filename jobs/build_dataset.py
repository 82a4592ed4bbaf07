"""Build a multi-domain (degraded, clean) WebDataset with a manifest.

    python jobs/build_dataset.py                                   # embedded default corpus -> data/default
    python jobs/build_dataset.py output=s3://bucket/corpus s3.endpoint_url=http://127.0.0.1:9000
    python jobs/build_dataset.py paired.lq_dir=Rain100L/input paired.gt_dir=Rain100L/target \\
        paired.domain=natural paired.task=derain paired.split=test output=data/rain100l
    python jobs/build_dataset.py clean.dir=my_scans clean.domain=medical clean.tasks=[ct_low_dose] output=data/mine
"""

import sys

if __name__ == "__main__":
    from datprl.platform.data.build import main

    raise SystemExit(main(sys.argv[1:]))
