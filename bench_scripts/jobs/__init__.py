"""The benchmark grid's job graph and where it runs (issue 28).

``job`` (a Job: kind, inputs, outputs, resources, timeout; its Outcome), ``graph`` (the Graph, ``run_graph`` and
the Report), ``process`` (the one place that runs a job: time limits, child processes, threads, signals, logs),
``local`` (the default executor: this process, or a pool of worker processes) and ``cluster`` (Ray). See
docs/cluster.md.
"""
