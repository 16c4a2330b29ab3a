"""The compatibility matrix against a real BackdoorBench checkout (``python -m bench_scripts.compat``): ``run``
(the commands and the cells), ``matrix`` (its pure parts: the subset, one-line reasons, the CSV / README)."""
