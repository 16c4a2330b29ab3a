"""backdoorbench-fst: Feature Shift Tuning (NeurIPS 2023) and its baselines as BackdoorBench defenses."""
__version__ = "0.1.0"
