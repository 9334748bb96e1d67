"""Recall benchmarks: MQAR (mqar.py), its training runner (runner.py), the recall-vs-state-size
sweeps (sweep.py, plots.py) and their `memzoo sweep` command (cli_sweep.py)."""
