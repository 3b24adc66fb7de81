"""diffcp.models: the released checkpoints load with strict=True, and the parts do what the papers' code does."""

import math

import numpy as np
import pytest
import torch

from diffcp.datasets import modelnet40 as mn
from diffcp.datasets.protocols import RegistrationPairs
from diffcp.geometry import rotation_error, so3_exp
from diffcp.models import DCP, DGCNN, PointNet, PointNetLK, load_dcp, load_pointnetlk, se3_exp, weights_folder
from diffcp.models.dcp import LayerNorm, SVDHead
from diffcp.models.dgcnn import graph_features, knn_indices

DCP_V1 = weights_folder() / "dcp_v1.t7"
PNLK = weights_folder() / "pointnetlk_learning3d.t7"
needs_dcp = pytest.mark.skipif(not DCP_V1.exists(), reason=f"{DCP_V1} is absent")
needs_pnlk = pytest.mark.skipif(not PNLK.exists(), reason=f"{PNLK} is absent")
needs_data = pytest.mark.skipif(not mn.default_folder().exists(), reason="the ModelNet40 subset is absent")


def _pairs(count, name="clean"):
    data = mn.load_modelnet40("test")
    pairs = [RegistrationPairs(data.points[:count], name, item_seeds=data.rows[:count])[i] for i in range(count)]
    return tuple(torch.stack(x) for x in zip(*pairs))


@needs_dcp
def test_dcp_v1_checkpoint_loads_strictly_and_evaluates():
    model = load_dcp("v1")
    assert not model.training and isinstance(model.pointer, torch.nn.Module)
    state = torch.load(DCP_V1, map_location="cpu", weights_only=True)
    assert set(model.state_dict()) == set(state)
    assert torch.equal(model.emb_nn.conv5.weight, state["emb_nn.conv5.weight"])


def test_missing_checkpoint_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFCP_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="DIFFCP_WEIGHTS"):
        load_dcp("v1")
    with pytest.raises(ValueError, match="variant must be"):
        load_dcp("v3")


def test_dcp_v2_has_the_authors_module_names():
    keys = {k: tuple(v.shape) for k, v in DCP("dgcnn", "transformer").state_dict().items() if k.startswith("pointer.")}
    assert len(keys) == 46  # encoder 18, decoder 28 (1 block, biases, two LayerNorm parameters each)
    assert keys["pointer.model.encoder.layers.0.self_attn.linears.3.weight"] == (512, 512)
    assert keys["pointer.model.decoder.layers.0.src_attn.linears.0.bias"] == (512,)
    assert keys["pointer.model.decoder.layers.0.feed_forward.w_1.weight"] == (1024, 512)
    assert keys["pointer.model.decoder.layers.0.sublayer.2.norm.a_2"] == (512,)
    assert keys["pointer.model.encoder.norm.b_2"] == (512,)


def test_identity_pointer_doubles_the_embeddings():
    torch.manual_seed(0)
    model = DCP("pointnet", "identity", emb_dims=32).eval()
    x, y = torch.randn(2, 30, 3), torch.randn(2, 40, 3)
    e, f = model.embeddings(x, y)
    assert torch.allclose(e, 2 * model.emb_nn(x.transpose(1, 2))) and torch.allclose(f, 2 * model.emb_nn(y.transpose(1, 2)))


def test_transformer_pointer_reads_the_other_cloud():
    torch.manual_seed(0)
    model = DCP("pointnet", "transformer", emb_dims=16, ff_dims=8).eval()
    x, y, z = torch.randn(1, 20, 3), torch.randn(1, 25, 3), torch.randn(1, 25, 3)
    e1, _ = model.embeddings(x, y)
    e2, _ = model.embeddings(x, z)
    assert not torch.allclose(e1, e2)  # the source's embedding depends on the target
    src, tgt = model.emb_nn(x.transpose(1, 2)), model.emb_nn(y.transpose(1, 2))
    _, tgt_p = model.pointer(src, tgt)
    expected = model.pointer.model.decoder(tgt.transpose(1, 2), model.pointer.model.encoder(src.transpose(1, 2)))
    assert torch.allclose(tgt_p, expected.transpose(1, 2))


def test_layer_norm_uses_the_unbiased_std():
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    expected = (x - 3.0) / (torch.tensor(14.0 / 3).sqrt() + 1e-6)
    assert torch.allclose(LayerNorm(4)(x), expected)


def test_svd_head_matches_a_per_item_svd():
    """The authors' head: soft matches, H = sum a b^T, R = V U^T with the reflection fixed."""
    g = torch.Generator().manual_seed(1)
    e, f = torch.randn(3, 8, 50, generator=g), torch.randn(3, 8, 60, generator=g)
    x, y = torch.randn(3, 50, 3, generator=g, dtype=torch.float64), torch.randn(3, 60, 3, generator=g, dtype=torch.float64)
    out = SVDHead()(e.double(), f.double(), x, y)
    p = torch.softmax(e.transpose(1, 2).double() @ f.double() / math.sqrt(8), dim=-1)
    m = p @ y
    for b in range(3):
        a, c = x[b] - x[b].mean(0), m[b] - m[b].mean(0)
        U, _, Vh = torch.linalg.svd(a.T @ c)
        R = Vh.T @ U.T
        if torch.det(R) < 0:
            R = Vh.T @ torch.diag(torch.tensor([1.0, 1, -1], dtype=R.dtype)) @ U.T
        assert torch.allclose(out.rotation[b], R, atol=1e-9)
        assert torch.allclose(out.translation[b], m[b].mean(0) - R @ x[b].mean(0), atol=1e-9)


def test_dgcnn_edge_features_are_neighbour_then_centre():
    x = torch.tensor([[[0.0, 1.0, 3.0, 7.0]]])
    assert knn_indices(x, 2)[0].tolist() == [[0, 1], [1, 0], [2, 1], [3, 2]]
    feats = graph_features(x, k=2)  # (1, 2, 4, 2)
    assert feats[0, 0].tolist() == [[0, 1], [1, 0], [3, 1], [7, 3]]  # x_j
    assert feats[0, 1].tolist() == [[0, 0], [1, 1], [3, 3], [7, 7]]  # x_i
    assert tuple(DGCNN(emb_dims=16, k=4).eval()(torch.randn(2, 3, 30)).shape) == (2, 16, 30)


def test_pointnet_bias_flag_and_shape_errors():
    assert PointNet(bias=True).conv1.bias is not None and PointNet().conv1.bias is None
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, N\)"):
        PointNet()(torch.randn(2, 10, 3))
    with pytest.raises(ValueError, match="source must be a tensor"):
        DCP("pointnet", emb_dims=8)(torch.randn(10, 3), torch.randn(1, 10, 3))
    with pytest.raises(ValueError, match="embedding must be"):
        DCP("pointnet++")


def test_se3_exp_matches_the_matrix_exponential():
    xi = torch.tensor([[0.3, -0.2, 0.5, 1.0, 2.0, -1.0], [1e-5, 2e-5, 0.0, 0.1, 0.0, 0.0], [0, 0, 0, 1, 2, 3]],
                      dtype=torch.float64)
    twist = torch.zeros(3, 4, 4, dtype=torch.float64)
    twist[:, :3, :3] = so3_exp(xi[:, :3]).new_zeros(3, 3, 3) + torch.stack(
        [torch.tensor([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]]) for w in xi[:, :3]])
    twist[:, :3, 3] = xi[:, 3:]
    assert torch.allclose(se3_exp(xi), torch.linalg.matrix_exp(twist), atol=1e-12)


@needs_pnlk
def test_pointnetlk_checkpoint_loads_strictly():
    model = load_pointnetlk()
    assert not model.training and torch.allclose(model.dt, torch.full((1, 6), 0.01))
    assert model.feature_model.conv5.weight.shape == (1024, 128, 1)


@needs_pnlk
@needs_data
def test_pointnetlk_improves_over_identity_on_clean_pairs():
    torch.set_num_threads(1)
    source, target, R, t = _pairs(6)
    with torch.no_grad():
        out = load_pointnetlk()(source, target, max_iterations=10)
    before = rotation_error(torch.eye(3).expand(6, 3, 3), R)
    after = rotation_error(out.transform[:, :3, :3], R)
    assert float(after.median()) < 0.2 * float(before.median())
    assert float((out.transform[:, :3, 3] - t).norm(dim=1).median()) < 0.2 * float(t.norm(dim=1).median())


@needs_dcp
@needs_data
def test_dcp_v1_registers_clean_pairs():
    torch.set_num_threads(1)
    source, target, R, t = _pairs(4)
    with torch.no_grad():
        out = load_dcp("v1")(source, target)
    assert float(rotation_error(out.rotation, R).max()) < 5.0
    assert float((out.translation - t).norm(dim=1).max()) < 0.02
