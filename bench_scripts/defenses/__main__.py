"""``python -m bench_scripts.defenses``: run the defense grid on cached records (bench_scripts/defenses/run.py)."""
from bench_scripts.defenses.run import main

main()
