"""The pieces of ``table.md`` and the figures, each from results.csv (and the defenses' per-epoch CSVs):

* ``tables``  — the main table, the per-run detail, the ablations, the timings and what could not be shown;
* ``figures`` — per-epoch efficiency curves, the α sweep and the tuning-set size;
* ``targets`` — each protocol's targets, checked one by one;
* ``probes``  — the retuning attack and QRA section, the fresh-head and per-stage probe tables.

``make_table`` puts them together (``python -m bench_scripts.report``).
"""
