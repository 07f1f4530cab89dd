"""Identity sources (inventory, Kubernetes) feeding one lookup interface."""
