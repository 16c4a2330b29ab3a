"""BackdoorBench's checkout as a target: ``install`` writes launchers into it (installer), ``export`` writes
self-contained defense scripts rendered from the core's own source (exporter, core_source, defense.py.tmpl)."""
