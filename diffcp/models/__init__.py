"""Learned models of the experiments: :mod:`diffcp.models.pose_cnn` (pose regression from depth pairs)."""
