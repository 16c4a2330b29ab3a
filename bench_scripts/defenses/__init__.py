"""Step 2 of the grid: the defenses on each record (``python -m bench_scripts.defenses``): ``run`` (ours and
BackdoorBench's built-ins as jobs of the grid), ``builtins`` (BackdoorBench's own scripts, capped, with the import
hook in ``bb_hook/``), ``ablations`` (the paper's ablations as extra variants)."""
