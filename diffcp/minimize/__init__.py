"""Step 5: minimise the error metric for fixed correspondences.

- :mod:`.residuals`: point-to-point, point-to-plane and symmetric residuals with analytic
  Jacobians w.r.t. the left twist;
- :mod:`.procrustes`: the closed-form point-to-point solution (rigid, or a similarity by
  Umeyama's scale) with a stable backward;
- :mod:`.linear_solve`: the damped batched LU solve with a transposed-LU backward;
- :mod:`.gauss_newton`: one linearised step for any metric;
- :mod:`.levenberg_marquardt`: bounded, batched Levenberg-Marquardt.
"""

from .gauss_newton import gauss_newton_step, normal_equations
from .levenberg_marquardt import LMResult, levenberg_marquardt
from .linear_solve import damped_solve
from .procrustes import Procrustes, Similarity, procrustes, procrustes_conditioning, umeyama
from .residuals import METRICS, residuals, residuals_and_jacobian, weighted_cost

__all__ = [
    "METRICS",
    "residuals",
    "residuals_and_jacobian",
    "weighted_cost",
    "Procrustes",
    "procrustes",
    "procrustes_conditioning",
    "Similarity",
    "umeyama",
    "damped_solve",
    "normal_equations",
    "gauss_newton_step",
    "LMResult",
    "levenberg_marquardt",
]
