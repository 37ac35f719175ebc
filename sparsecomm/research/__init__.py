"""The research instrument: the plan's experiment matrix (matrix.py), its analysis and verdicts
(analysis.py) and the generated report (report.py). `sparsecomm matrix --help`."""
