"""Issue 9's speed check (``python -m bench_scripts.speed``): ``run`` (the command), ``measures`` (the compute
limit, our defense on both input paths, BackdoorBench's ft, attack training), ``report`` (what it prints and writes)."""
