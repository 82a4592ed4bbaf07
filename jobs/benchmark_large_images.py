"""Large-image benchmark: peak resident memory and time of one request per size (512 to 4096 px), and the largest
size's peak against the 1024x1024 one's (target: 1.5x at most).

    python jobs/benchmark_large_images.py                        # the replica's request path, a subprocess per size
    python jobs/benchmark_large_images.py runs=3
    python jobs/benchmark_large_images.py path=both http_sizes=[512,1024]   # also through HTTP to a local app
"""

import sys

if __name__ == "__main__":
    from datprl.platform.bench.large_images import main

    raise SystemExit(main(sys.argv[1:]))
