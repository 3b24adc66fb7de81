"""Datasets of the experiments: :mod:`diffcp.datasets.body_pairs` (depth-map pairs of a posed body)."""
