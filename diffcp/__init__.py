"""diffcp: differentiable, batched Iterative Closest Point in PyTorch.

Convention, everywhere: column vectors, and a transform maps the **source into the target**,
``y = R x + t``. Clouds are ``(B, N, 3)`` (or ``(N, 3)``) with optional per-cloud lengths;
transforms are ``(B, 4, 4)``.

The pipeline, one module per step (see ``ARCHITECTURE.md``):

- step 1, :mod:`diffcp.select`: which source points take part;
- step 2, :mod:`diffcp.correspond`: hard, soft and projective correspondences
  (search backends in :mod:`diffcp.search`);
- step 3, :mod:`diffcp.weight`: linear and robust weights;
- step 4, :mod:`diffcp.reject`: hard and soft rejection;
- step 5, :mod:`diffcp.minimize`: Procrustes, Gauss-Newton and Levenberg-Marquardt for the
  point-to-point, point-to-plane and symmetric metrics;
- :func:`diffcp.icp` composes them, with ``unroll``, ``truncated`` and ``implicit`` backward modes;
  :class:`diffcp.ICP` is the same as a ``torch.nn.Module`` with learnable temperatures;
- :mod:`diffcp.settings`: which ICP, as immutable data (one option per step, JSON round trip).
"""

from .camera import backproject, depth_to_points, intrinsics_matrix, normals_from_depth, project
from .correspond import (
    Correspondences,
    nearest_correspondences,
    projective_correspondences,
    soft_correspondences,
)
from .geometry import (
    apply_twist,
    euler_to_rotation,
    invert_transform,
    make_transform,
    random_rotation,
    random_transform,
    rotation_angle,
    rotation_error,
    rotation_to_euler,
    so3_exp,
    so3_log,
    split_transform,
    transform_points,
    translation_error,
    twist_between,
)
from .icp import ICPResult, icp
from .layer import ICP
from .minimize.gauss_newton import gauss_newton_step
from .minimize.levenberg_marquardt import LMResult, levenberg_marquardt
from .minimize.linear_solve import damped_solve
from .minimize.procrustes import Procrustes, Similarity, procrustes, umeyama
from .minimize.residuals import residuals, residuals_and_jacobian, weighted_cost
from .normals import estimate_normals
from .render import DepthRender, look_at, render_depth
from .reject import reject_by_distance, reject_by_normal_angle
from .search import KNN, NearestNeighborIndex, SoftMatch, knn, soft_nearest
from .settings import (
    DistanceRejection,
    DistanceWeights,
    GaussNewtonSolver,
    ICPSettings,
    ImplicitBackward,
    LevenbergMarquardtSolver,
    NearestNeighbor,
    NormalAngleRejection,
    NormalWeights,
    ProcrustesSolver,
    ProjectiveAssociation,
    RandomSelection,
    RobustKernel,
    SoftNearestNeighbor,
    Stopping,
    TruncatedBackward,
    UnrollBackward,
)
from .select import select_all, select_mask, select_random
from .weight import distance_weights, normal_weights, robust_weights

__version__ = "0.1.0"

__all__ = [
    # the loop
    "icp", "ICP", "ICPResult",
    # the settings, one option per step
    "ICPSettings", "NearestNeighbor", "SoftNearestNeighbor", "ProjectiveAssociation",
    "ProcrustesSolver", "GaussNewtonSolver", "LevenbergMarquardtSolver",
    "DistanceWeights", "NormalWeights", "RobustKernel", "DistanceRejection", "NormalAngleRejection",
    "RandomSelection", "Stopping", "UnrollBackward", "TruncatedBackward", "ImplicitBackward",
    # step 1
    "select_all", "select_random", "select_mask",
    # step 2
    "Correspondences", "nearest_correspondences", "soft_correspondences", "projective_correspondences",
    "knn", "KNN", "NearestNeighborIndex", "soft_nearest", "SoftMatch", "estimate_normals",
    # step 3 and 4
    "distance_weights", "normal_weights", "robust_weights", "reject_by_distance", "reject_by_normal_angle",
    # step 5
    "procrustes", "Procrustes", "umeyama", "Similarity", "residuals", "residuals_and_jacobian", "weighted_cost", "damped_solve",
    "gauss_newton_step", "levenberg_marquardt", "LMResult",
    # geometry and cameras
    "so3_exp", "so3_log", "make_transform", "split_transform", "invert_transform", "transform_points",
    "apply_twist", "twist_between", "rotation_angle", "rotation_error", "translation_error",
    "random_rotation", "random_transform", "euler_to_rotation", "rotation_to_euler",
    "intrinsics_matrix", "project", "backproject", "depth_to_points", "normals_from_depth",
    "render_depth", "DepthRender", "look_at",
]
