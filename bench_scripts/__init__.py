"""Benchmark scripts for issue #3 (run as ``python -m bench_scripts.<script>``; see bench_scripts/README.md).

OMP_WAIT_POLICY=PASSIVE is set before torch is imported: on a shared 2-core machine, OpenMP's default
busy-waiting threads make a 2-thread training run 3-4x slower whenever another process competes for the
cores (measured here: 1.8 s vs 6-8 s per ResNet-9 step under load); an explicit user setting wins.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
