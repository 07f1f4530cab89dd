"""Publishing: the Prometheus collector, the /metrics listener and the textfile writer."""
