"""Learned registration models whose released weights the experiments use.

- :mod:`diffcp.models.dgcnn`, :mod:`diffcp.models.pointnet`: per-point embeddings;
- :mod:`diffcp.models.dcp`: Deep Closest Point v1 / v2 (SVD head on :func:`diffcp.procrustes`);
- :mod:`diffcp.models.pointnetlk`: PointNetLK as learning3d implements it;
- :mod:`diffcp.models.checkpoints`: where the released checkpoints are read from;
- :mod:`diffcp.models.pose_cnn`: a CNN regressing the pose between two depth maps (6D rotation).

Module names match the authors' releases so that their ``state_dict`` s load with ``strict=True``.
"""

from .checkpoints import read_state_dict, weights_folder, weights_path
from .dcp import DCP, DCPOutput, load_dcp
from .dgcnn import DGCNN
from .pointnet import PointNet
from .pointnetlk import LKResult, PointNetLK, load_pointnetlk, se3_exp

__all__ = [
    "DCP", "DCPOutput", "load_dcp", "DGCNN", "PointNet", "PointNetLK", "LKResult", "load_pointnetlk", "se3_exp",
    "weights_folder", "weights_path", "read_state_dict",
]
