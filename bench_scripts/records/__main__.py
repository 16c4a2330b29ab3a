"""``python -m bench_scripts.records``: make the attack records (bench_scripts/records/make.py)."""
from bench_scripts.records.make import main

main()
