"""``python -m bench_scripts.report``: table.md and the figures from results.csv
(bench_scripts/report/make_table.py)."""
from bench_scripts.report.make_table import main

main()
