"""Step 3 of the grid: every model measured by one evaluator (``python -m bench_scripts.evaluation``):
``evaluate`` (results.csv, the retuning attack and QRA on each model), ``measures`` (C-Acc / ASR / RA and the
feature measures), ``diagnostics`` (t-SNE, the fresh-head and per-stage probes)."""
