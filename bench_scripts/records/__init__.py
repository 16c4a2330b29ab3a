"""Step 1 of the grid: backdoored models written as BackdoorBench attack records (``python -m
bench_scripts.records``; ``make``: the attacks, the record as a job of the grid)."""
