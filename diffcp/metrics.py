"""Registration metrics: DCP's six anisotropic figures, isotropic errors and recall.

DCP (Wang & Solomon 2019, and its ``main.py``) reports, over all test pairs:

- rotation: MSE, RMSE and MAE, in degrees, of the differences between predicted and true Euler
  angles, over all three angles of all pairs. The angles are SciPy's extrinsic ``'zyx'`` (the
  angles ``(z, y, x)`` with ``R = Rx(x) Ry(y) Rz(z)``, the way DCP draws its rotations); with
  diffcp's :func:`~diffcp.geometry.rotation_to_euler` that is ``rotation_to_euler(R, "xyz")``
  read backwards (its ``order="zyx"`` is SciPy's *intrinsic* ``'ZYX'``, ``R = Rz Ry Rx``, a
  different triple: using it changes DCP-v1's RMSE on the airplanes by tenths of a degree);
- translation: MSE, RMSE and MAE of the differences of the three components.

These depend on the axes (anisotropic) and on the Euler convention; the isotropic errors do not:
the geodesic angle of ``R_pred^T R_true`` in degrees (:func:`~diffcp.geometry.rotation_error`)
and the Euclidean distance of the translations, here averaged over pairs (RPM-Net's "isotropic"
columns). Recall is the share of pairs with both errors under stated thresholds.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor

from diffcp.geometry import rotation_error, rotation_to_euler, translation_error

__all__ = ["RegistrationMetrics", "dcp_euler_degrees", "registration_metrics", "RECALL_THRESHOLDS"]

#: (rotation degrees, translation) pairs for recall: tight and loose.
RECALL_THRESHOLDS: Tuple[Tuple[float, float], ...] = ((1.0, 0.01), (5.0, 0.1))


class RegistrationMetrics(NamedTuple):
    """DCP's six anisotropic figures, the mean isotropic errors, and recall (plain floats)."""

    mse_r: float  # deg^2, Euler 'zyx' (extrinsic, as DCP)
    rmse_r: float  # deg
    mae_r: float  # deg
    mse_t: float
    rmse_t: float
    mae_t: float
    isotropic_r_deg: float  # mean geodesic rotation error, degrees
    isotropic_t: float  # mean Euclidean translation error
    recall: Dict[str, float]  # "<r>deg_<t>" -> share of pairs with both errors below

    def as_dict(self) -> Dict[str, object]:
        return self._asdict()


def dcp_euler_degrees(rotation: Tensor) -> Tensor:
    """DCP's Euler angles ``(..., 3)`` in degrees: ``(z, y, x)`` with ``R = Rx(x) Ry(y) Rz(z)``.

    The same as ``scipy.spatial.transform.Rotation.from_matrix(R).as_euler('zyx', degrees=True)``
    (extrinsic, lower-case), which DCP's ``npmat2euler`` computes.

    Example:
        >>> from diffcp.geometry import euler_to_rotation
        >>> R = euler_to_rotation(torch.deg2rad(torch.tensor([10., 20., 30.], dtype=torch.float64)), "xyz")
        >>> [round(a, 6) for a in dcp_euler_degrees(R).tolist()]
        [30.0, 20.0, 10.0]
    """
    return torch.rad2deg(rotation_to_euler(rotation, order="xyz").flip(-1))


def registration_metrics(rotation: Tensor, translation: Tensor, true_rotation: Tensor, true_translation: Tensor,
                         thresholds: Sequence[Tuple[float, float]] = RECALL_THRESHOLDS) -> RegistrationMetrics:
    """Metrics of predicted transforms ``(B, 3, 3), (B, 3)`` against the true ones, over the batch.

    Example:
        >>> R = torch.eye(3).expand(4, 3, 3)
        >>> m = registration_metrics(R, torch.zeros(4, 3), R, torch.full((4, 3), 0.1))
        >>> round(m.rmse_t, 6), round(m.isotropic_r_deg, 6), m.recall["5deg_0.1"]
        (0.1, 0.0, 0.0)
    """
    for name, x, shape in (("rotation", rotation, (3, 3)), ("true_rotation", true_rotation, (3, 3)),
                           ("translation", translation, (3,)), ("true_translation", true_translation, (3,))):
        if not isinstance(x, Tensor) or x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"{name} must be a tensor of shape (B, {', '.join(map(str, shape))}); got {getattr(x, 'shape', type(x))}.")
    if len({rotation.shape[0], translation.shape[0], true_rotation.shape[0], true_translation.shape[0]}) != 1:
        raise ValueError("rotation, translation, true_rotation and true_translation must hold the same number of pairs.")
    R, t = rotation.double(), translation.double()
    R_true, t_true = true_rotation.double(), true_translation.double()
    de = dcp_euler_degrees(R) - dcp_euler_degrees(R_true)
    dt = t - t_true
    r_err, t_err = rotation_error(R, R_true), translation_error(t, t_true)
    recall = {f"{a:g}deg_{b:g}": float(((r_err < a) & (t_err < b)).double().mean()) for a, b in thresholds}
    mse_r, mse_t = float((de ** 2).mean()), float((dt ** 2).mean())
    return RegistrationMetrics(mse_r, mse_r ** 0.5, float(de.abs().mean()), mse_t, mse_t ** 0.5, float(dt.abs().mean()),
                               float(r_err.mean()), float(t_err.mean()), recall)
