"""`make bench`: kmeshd's overhead and exactness under connection churn (see run.py)."""
