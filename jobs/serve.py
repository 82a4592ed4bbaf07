"""Serve DATPRL-IR restoration over HTTP on Ray Serve.

python jobs/serve.py                                   # local Ray, http://127.0.0.1:8000, fresh paper_tiny
                                                       # (or outputs/train/model.safetensors when training ran)
python jobs/serve.py weights=outputs/train/model.safetensors port=8080
RAY_ADDRESS=auto python jobs/serve.py weights=s3://bucket/run/model.safetensors   # deploy to a running cluster
python jobs/serve.py --help                            # every field
"""

import sys

if __name__ == "__main__":
    from datprl.serve.launch import main

    raise SystemExit(main(sys.argv[1:]))
