"""``python -m bench_scripts.evaluation``: the one evaluator -> results.csv (bench_scripts/evaluation/evaluate.py)."""
from bench_scripts.evaluation.evaluate import main

main()
