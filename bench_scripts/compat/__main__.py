"""``python -m bench_scripts.compat``: the compatibility matrix (bench_scripts/compat/run.py)."""
import sys

from bench_scripts.compat.run import main

sys.exit(main())
