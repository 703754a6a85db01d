"""Evaluation on published benchmarks (and the toy world): readers, official metrics, runs, the paper's table."""
