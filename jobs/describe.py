"""Describe every clean source image of a dataset and embed the descriptions (the domain priors): from records and
image statistics by default, or with a vision-language model on vLLM (describer=vllm).

    python jobs/describe.py                                        # data/default -> data/default/priors
    python jobs/describe.py dataset=data/mine output=data/mine/priors splits=[train,val]
    python jobs/describe.py dataset=s3://bucket/corpus output=s3://bucket/corpus/priors \\
        s3.endpoint_url=http://127.0.0.1:9000
    python jobs/describe.py describer=vllm vllm.model=/models/blip2 "vllm.prompt_template='Question: {prompt} Answer:'"
    ray job submit --working-dir . -- python jobs/describe.py infra/describe-cluster.yaml   # LLaVA-1.5 + CLIP
"""

import sys

if __name__ == "__main__":
    from datprl.priors.job import main

    raise SystemExit(main(sys.argv[1:]))
