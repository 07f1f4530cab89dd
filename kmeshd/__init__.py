"""kmeshd: node-level TCP telemetry from eBPF, as Kmesh L4 metrics and access logs."""

__version__ = "0.1.0"
