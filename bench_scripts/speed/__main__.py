"""``python -m bench_scripts.speed``: the speed check on one record (bench_scripts/speed/run.py)."""
import sys

from bench_scripts.speed.run import main

sys.exit(main())
