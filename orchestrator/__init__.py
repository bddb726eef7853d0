"""orchestrator: train PyTorch models from one job file, locally, on a Ray cluster or on Kubernetes."""

__version__ = "0.1.0"
