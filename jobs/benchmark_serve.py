"""Serving benchmark: p50/p99 latency and throughput of POST /v1/restore against in-process model calls on the same
images, and the overhead ratio.

    python jobs/benchmark_serve.py                          # local Ray + Serve, paper_tiny, 64x64, 200 requests
    python jobs/benchmark_serve.py size=128 clients=16
    python jobs/benchmark_serve.py url=http://127.0.0.1:8000 weights=outputs/train/model.safetensors
"""

import sys

if __name__ == "__main__":
    from datprl.serve.benchmark import main

    raise SystemExit(main(sys.argv[1:]))
