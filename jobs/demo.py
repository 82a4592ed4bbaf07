"""Model demo, a one-image smoke run without Ray: restore a real image with a randomly initialised tiny network.

python jobs/demo.py                              # embedded default: scikit-image's astronaut, paper_tiny
python jobs/demo.py variant=paper crop=128 output_dir=outputs/demo-paper
"""

import sys

if __name__ == "__main__":
    from datprl.platform.demo import main

    raise SystemExit(main(sys.argv[1:]))
