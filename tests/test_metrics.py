"""diffcp.metrics: DCP's Euler-angle figures, isotropic errors and recall, against SciPy and numpy."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from diffcp.metrics import dcp_euler_degrees, registration_metrics


def _rotations(n, seed, max_deg=45.0):
    rng = np.random.RandomState(seed)
    return Rotation.from_euler("zyx", rng.uniform(0, max_deg, size=(n, 3)), degrees=True).as_matrix()


def test_euler_angles_are_scipys_extrinsic_zyx():
    R = _rotations(50, 0)
    mine = dcp_euler_degrees(torch.as_tensor(R)).numpy()
    assert np.allclose(mine, Rotation.from_matrix(R).as_euler("zyx", degrees=True), atol=1e-9)
    assert not np.allclose(mine, Rotation.from_matrix(R).as_euler("ZYX", degrees=True), atol=1e-2)


def test_six_dcp_figures_and_isotropic_errors_against_numpy():
    R_true, R_pred = _rotations(20, 1), _rotations(20, 2, max_deg=50)
    rng = np.random.RandomState(3)
    t_true, t_pred = rng.uniform(-0.5, 0.5, (20, 3)), rng.uniform(-0.5, 0.5, (20, 3))
    m = registration_metrics(*(torch.as_tensor(a) for a in (R_pred, t_pred, R_true, t_true)))
    de = Rotation.from_matrix(R_pred).as_euler("zyx", degrees=True) - Rotation.from_matrix(R_true).as_euler("zyx", degrees=True)
    assert m.mse_r == pytest.approx(np.mean(de ** 2)) and m.rmse_r == pytest.approx(np.sqrt(np.mean(de ** 2)))
    assert m.mae_r == pytest.approx(np.mean(np.abs(de)))
    dt = t_pred - t_true
    assert m.mse_t == pytest.approx(np.mean(dt ** 2)) and m.mae_t == pytest.approx(np.mean(np.abs(dt)))
    geodesic = (Rotation.from_matrix(R_pred).inv() * Rotation.from_matrix(R_true)).magnitude()
    assert m.isotropic_r_deg == pytest.approx(np.degrees(geodesic).mean())
    assert m.isotropic_t == pytest.approx(np.linalg.norm(dt, axis=1).mean())


def test_recall_counts_pairs_under_both_thresholds():
    R_true = torch.eye(3, dtype=torch.float64).expand(4, 3, 3)
    angles = torch.tensor([0.5, 2.0, 0.5, 10.0], dtype=torch.float64)
    R_pred = torch.as_tensor(Rotation.from_euler("z", angles.numpy()[:, None], degrees=True).as_matrix())
    t_err = torch.tensor([0.005, 0.005, 0.05, 0.005], dtype=torch.float64)
    t_pred = torch.zeros(4, 3, dtype=torch.float64)
    t_pred[:, 0] = t_err
    m = registration_metrics(R_pred, t_pred, R_true, torch.zeros(4, 3, dtype=torch.float64),
                             thresholds=((1.0, 0.01), (5.0, 0.1)))
    assert m.recall == {"1deg_0.01": 0.25, "5deg_0.1": 0.75}
    assert set(m.as_dict()) >= {"mse_r", "rmse_r", "mae_r", "mse_t", "rmse_t", "mae_t", "isotropic_r_deg", "isotropic_t", "recall"}


def test_bad_shapes_are_named():
    R, t = torch.eye(3).expand(2, 3, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="translation must be a tensor of shape"):
        registration_metrics(R, torch.zeros(2, 4), R, t)
    with pytest.raises(ValueError, match="same number of pairs"):
        registration_metrics(R, t, R[:1], t[:1])
