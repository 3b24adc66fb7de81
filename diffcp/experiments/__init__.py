"""Experiment entry points: settings in, results of record (``book/_data/*.json``) out.

- :mod:`diffcp.experiments.modelnet40_eval`: ModelNet40 registration under every protocol
  (identity, FGR, PointNetLK, DCP-v1, each without and with diffcp ICP);
- :mod:`diffcp.experiments.body_toy`: body-model depth maps, a pose CNN with and without
  differentiable ICP (train, evaluate, results of record);
- :mod:`diffcp.experiments.dcp_train`: DCP trained alone or end to end through differentiable ICP
  (checkpoints every epoch, resumable, DistributedDataParallel);
- :mod:`diffcp.experiments.progress`: the tqdm bar they share.
"""
