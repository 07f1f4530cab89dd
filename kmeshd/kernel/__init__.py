"""The kernel edge: building, attaching and reading the TCP probe (see probe.py)."""
