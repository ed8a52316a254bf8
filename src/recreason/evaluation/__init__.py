"""Metrics defined as in PETER/PEPLER/NRT, baselines and reports."""
