"""Evaluation: scenes alignment (alignment.py), feature networks (features.py), distribution
metrics (distribution.py), one run measured (runs.py) and the report (report.py)."""
