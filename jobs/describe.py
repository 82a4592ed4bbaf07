"""Describe every clean source image of a dataset and embed the descriptions (the domain priors, no VLM).

    python jobs/describe.py                                        # data/default -> data/default/priors
    python jobs/describe.py dataset=data/mine output=data/mine/priors splits=[train,val]
    python jobs/describe.py dataset=s3://bucket/corpus output=s3://bucket/corpus/priors \\
        s3.endpoint_url=http://127.0.0.1:9000
"""

import sys

if __name__ == "__main__":
    from datprl.priors.job import main

    raise SystemExit(main(sys.argv[1:]))
