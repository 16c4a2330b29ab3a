"""The test suite, one subpackage per part of ``fst_plugin`` (core, models, data, record, adapter, probes), plus
the workflows (attack training, demo), the benchmark scripts, the robustness suite and the packaging checks.

``tests`` is a package so the helper module imports as ``tests.builders`` from any test (the repository root is
on ``sys.path`` through pytest's ``pythonpath = ["."]``), and test files in different folders may share a name.
"""
