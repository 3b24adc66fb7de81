"""diffcp.experiments.modelnet40_eval: the entry point writes the documented JSON layout."""

import json

import pytest
import torch

from diffcp.datasets import modelnet40 as mn
from diffcp.experiments import modelnet40_eval as ev
from diffcp.geometry import random_transform, transform_points
from shapes import sample

needs_data = pytest.mark.skipif(not mn.default_folder().exists(), reason="the ModelNet40 subset is absent")


def test_refine_is_the_one_icp_entry_and_improves_a_rough_start():
    g = torch.Generator().manual_seed(0)
    pts, _ = sample("bumpy_sphere", 1024, dtype=torch.float32)  # a surface with ModelNet's point spacing
    source = (pts / pts.norm(dim=-1).max()).expand(2, 1024, 3).contiguous()
    T = random_transform(2, max_angle=0.2, max_translation=0.1, generator=g)
    target = transform_points(T, source)
    for variant in ev.REFINE_VARIANTS:
        out = ev.refine(source, target, torch.eye(4).expand(2, 4, 4), variant)
        assert torch.allclose(out, T, atol=1e-3), variant
    with pytest.raises(ValueError, match="variant must be one of"):
        ev.refine(source, target, torch.eye(4).expand(2, 4, 4), "soft_reject")


@needs_data
def test_entry_point_writes_the_layout(tmp_path):
    out = tmp_path / "modelnet40.json"
    assert ev.main(["--out", str(out), "--max-objects", "2", "--protocols", "clean", "unseen",
                    "--methods", "identity", "dcp_v1"]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"provenance", "settings", "protocols", "quoted", "timing"}
    assert set(result["protocols"]) == {"clean", "unseen"}
    methods = result["protocols"]["clean"]
    assert set(methods) == {f"{m}{s}" for m in ("identity", "dcp_v1")
                            for s in ("", "+icp_hard", "+icp_soft", "+icp_hard_reject")}
    assert set(methods["dcp_v1"]) == {"mse_r", "rmse_r", "mae_r", "mse_t", "rmse_t", "mae_t", "isotropic_r_deg",
                                      "isotropic_t", "recall"}
    assert methods["dcp_v1"]["rmse_r"] < 5 < methods["identity"]["rmse_r"]
    assert methods["dcp_v1+icp_hard"]["rmse_r"] < 1e-3  # DCP's clean protocol gives the answer away
    assert result["settings"]["pairs_per_protocol"] == {"clean": 2, "unseen": 2}
    # the ICP of each variant is stored as data that rebuilds it
    from diffcp import ICPSettings
    for name, data in result["settings"]["icp_variants"].items():
        assert ICPSettings.from_dict(data) == ev.REFINE_SETTINGS[name]
    assert result["provenance"]["command"].startswith("python -m diffcp.experiments.modelnet40_eval")


def test_quoted_paper_tables_are_complete_and_consistent():
    from diffcp.experiments.modelnet40_eval import PAPER_TABLES, QUOTED

    tables = QUOTED[PAPER_TABLES]
    assert set(tables) == {"clean", "unseen", "noise_dcp"}
    for protocol, table in tables.items():
        assert set(table["rows"]) == {"ICP", "Go-ICP", "FGR", "PointNetLK", "DCP-v1", "DCP-v2"}, protocol
        for name, values in table["rows"].items():
            mse_r, rmse_r, mae_r, mse_t, rmse_t, mae_t = values
            # RMSE is the square root of MSE (to the paper's six digits), and MAE <= RMSE
            assert abs(rmse_r ** 2 - mse_r) < 1e-4 * max(1.0, mse_r), (protocol, name)
            assert abs(rmse_t ** 2 - mse_t) < 2e-6, (protocol, name)
            assert mae_r <= rmse_r and mae_t <= rmse_t, (protocol, name)
    ablation = next(v for k, v in QUOTED.items() if "Table 5" in k)
    assert ablation["DGCNN+DCP-v2"] == tables["clean"]["rows"]["DCP-v2"][:3]
    assert ablation["DGCNN+DCP-v1"] == tables["clean"]["rows"]["DCP-v1"][:3]


def test_fgr_is_deterministic():
    pytest.importorskip("open3d")
    from diffcp.experiments.modelnet40_eval import _fgr

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 512, 3, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=-1).amax(-1)[:, None, None]
    T = random_transform(2, max_angle=0.5, max_translation=0.1, generator=g, dtype=torch.float64)
    y = transform_points(T, x) + 0.01 * torch.randn(2, 512, 3, generator=g, dtype=torch.float64)
    first, again = _fgr(x, y), _fgr(x, y)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    torch.testing.assert_close(_fgr(x[1:], y[1:]), first[1:], rtol=0, atol=0)   # per pair, not per batch
