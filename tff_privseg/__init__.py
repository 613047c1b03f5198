"""Differentially private federated learning for multi-site CT segmentation on TFF."""

__version__ = "0.1.0"
