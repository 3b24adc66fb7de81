"""The released DCP-v1 reproduces the authors' figure on the 100 official test airplanes of the subset.

Protocol "clean" (DCP's unseen point clouds), each pair seeded with the airplane's index in the
official test split as DCP's ``np.random.seed(item)`` does. The authors' code gives a rotation RMSE
(Euler 'zyx', degrees) of 1.34 there; we require 1.34 +- 0.2. The figure moves by about a tenth
of a degree with the seeds alone (a few pairs with large errors dominate the RMSE): seeds 0..99 give
1.49, the positions in the subset file 1.56, official indices 1.47 (measured on a 2-core CPU).
The authors' own data.py + model.py + metric, run on the subset as it is (seeds = positions in the
file), give 1.5640 on the airplanes and 1.5816 on all 128 objects, the same as this code with those
seeds to four digits, and their model's rotations agree with DCP here to 1.5e-5: the 1.34 quoted
comes from another assignment of seeds, not from a difference in the model or the metric.
"""

import numpy as np
import pytest
import torch

from diffcp.datasets import modelnet40 as mn
from diffcp.datasets.protocols import RegistrationPairs
from diffcp.metrics import registration_metrics
from diffcp.models import load_dcp, weights_folder

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not mn.default_folder().exists(), reason="the ModelNet40 subset is absent"),
    pytest.mark.skipif(not (weights_folder() / "dcp_v1.t7").exists(), reason="dcp_v1.t7 is absent"),
]


def test_released_dcp_v1_on_the_100_test_airplanes():
    torch.set_num_threads(1)
    data = mn.load_modelnet40("test")
    airplanes = data.labels == 0
    assert airplanes.sum() == 100
    pairs = RegistrationPairs(data.points[airplanes], "clean", item_seeds=data.rows[airplanes])
    source, target, R, t = (torch.stack(x) for x in zip(*(pairs[i] for i in range(len(pairs)))))
    model = load_dcp("v1")
    with torch.no_grad():
        out = [model(source[i:i + 10], target[i:i + 10]) for i in range(0, 100, 10)]
    m = registration_metrics(torch.cat([o.rotation for o in out]), torch.cat([o.translation for o in out]), R, t)
    assert abs(m.rmse_r - 1.34) < 0.2, m
    assert m.rmse_t < 0.005 and np.isfinite(m.mae_r)
