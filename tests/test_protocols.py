"""diffcp.datasets.protocols: each protocol makes the pairs it documents."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from diffcp.datasets import modelnet40 as mn
from diffcp.datasets.protocols import (
    PROTOCOLS,
    RegistrationPairs,
    crop_half_space,
    dcp_transform,
    get_protocol,
    labels_for,
)

OBJECTS = np.random.RandomState(7).normal(size=(4, 2048, 3)).astype(np.float32)
needs_data = pytest.mark.skipif(not mn.default_folder().exists(), reason="the ModelNet40 subset is absent")


def _match(source, target, R, t):
    """Permutation p with target[p[i]] == R source[i] + t (nearest moved point), and the residuals."""
    moved = source.double() @ R.double().T + t.double()
    d = torch.cdist(moved, target.double())
    return d.argmin(dim=1), d.min(dim=1).values


def _dcp_reference(cloud, item):
    """DCP's data.py test draw, re-written: global seed, angles x, y, z, translation, two permutations."""
    np.random.seed(item)
    ax, ay, az = (np.random.uniform() * np.pi / 4 for _ in range(3))
    t = np.array([np.random.uniform(-0.5, 0.5) for _ in range(3)])
    R = Rotation.from_euler("zyx", [az, ay, ax]).as_matrix()
    src = cloud[:1024]
    tgt = src @ R.T + t
    return np.random.permutation(src), np.random.permutation(tgt), R, t


def test_transform_is_rx_ry_rz_and_scipy_extrinsic_zyx():
    R, t = dcp_transform(np.random.RandomState(3))
    rng = np.random.RandomState(3)
    ax, ay, az = (rng.uniform() * np.pi / 4 for _ in range(3))
    expected = Rotation.from_euler("zyx", [az, ay, ax]).as_matrix()
    assert np.allclose(R, expected, atol=1e-12)
    assert np.allclose(R, Rotation.from_euler("x", ax).as_matrix() @ Rotation.from_euler("y", ay).as_matrix()
                       @ Rotation.from_euler("z", az).as_matrix(), atol=1e-12)
    assert not np.allclose(R, Rotation.from_euler("ZYX", [az, ay, ax]).as_matrix(), atol=1e-3)
    angles = np.stack([Rotation.from_matrix(dcp_transform(np.random.RandomState(s))[0]).as_euler("zyx")
                       for s in range(300)])
    assert angles.min() >= 0 and angles.max() < math.pi / 4 and angles.max() > 0.9 * math.pi / 4


@pytest.mark.parametrize("item", [0, 5, 1234])
def test_clean_test_pairs_are_dcps(item):
    objects = np.random.RandomState(0).normal(size=(1, 2048, 3)).astype(np.float32)
    pair = RegistrationPairs(objects, "clean", item_seeds=[item])[0]
    src, tgt, R, t = _dcp_reference(objects[0], item)
    assert np.allclose(pair.source.numpy(), src, atol=1e-6)
    assert np.allclose(pair.target.numpy(), tgt, atol=1e-5)
    assert np.allclose(pair.rotation.numpy(), R, atol=1e-6) and np.allclose(pair.translation.numpy(), t, atol=1e-6)


@pytest.mark.parametrize("name", PROTOCOLS)
def test_test_transforms_are_fixed_per_item(name):
    a, b = RegistrationPairs(OBJECTS, name), RegistrationPairs(OBJECTS, name)
    first = [a[i] for i in range(4)]
    again = [a[i] for i in (3, 2, 1, 0)][::-1]  # other order, second read
    other = [b[i] for i in range(4)]
    for x, y, z in zip(first, again, other):
        assert torch.equal(x.rotation, y.rotation) and torch.equal(x.rotation, z.rotation)
        assert torch.equal(x.translation, z.translation)
        if name != "noise_dcp":  # DCP's noise accumulates on every read
            assert torch.equal(x.source, y.source) and torch.equal(x.target, z.target)
    assert not torch.equal(first[0].rotation, first[1].rotation)


def test_training_pairs_change_at_every_read():
    train = RegistrationPairs(OBJECTS, "clean", deterministic=False, seed=1)
    assert not torch.equal(train[0].rotation, train[0].rotation)


def test_clean_pairs_correspond_exactly_and_are_permuted():
    pair = RegistrationPairs(OBJECTS, "clean")[2]
    match, residual = _match(pair.source, pair.target, pair.rotation, pair.translation)
    assert residual.max() < 1e-5 and len(set(match.tolist())) == 1024
    assert (match != torch.arange(1024)).float().mean() > 0.9
    assert set(map(tuple, pair.source.numpy().round(6))) == set(map(tuple, OBJECTS[2, :1024].round(6)))


def test_fixed_noise_is_independent_on_each_cloud():
    clean = RegistrationPairs(OBJECTS, "clean")
    noisy = RegistrationPairs(OBJECTS, "noise")
    src_noise, tgt_noise = [], []
    for i in range(4):
        c, n = clean[i], noisy[i]
        assert torch.equal(c.rotation, n.rotation)  # same transforms as clean
        src_noise.append(n.source - c.source)  # same permutations as clean: noise is the difference
        tgt_noise.append((n.target - c.target) @ c.rotation)  # target noise, back in the source frame
    s, t = torch.cat(src_noise).double(), torch.cat(tgt_noise).double()
    assert abs(float(s.std()) - 0.01) < 1e-3 and abs(float(t.std()) - 0.01) < 1e-3
    assert float(s.abs().max()) <= 0.05 + 1e-6
    # the target's noise at a source point's match is not the source's noise: correlation ~ 0
    pair = clean[0]
    match, _ = _match(pair.source, pair.target, pair.rotation, pair.translation)
    paired = (noisy[0].target[match] - pair.target[match]) @ pair.rotation
    corr = np.corrcoef(src_noise[0].reshape(-1).numpy(), paired.reshape(-1).numpy())[0, 1]
    assert abs(corr) < 0.05


def test_dcp_noise_is_shared_and_accumulates():
    data = RegistrationPairs(OBJECTS, "noise_dcp", seed=0)
    first, second = data[1], data[1]
    for pair in (first, second):  # shared: the target is exactly the noisy source, moved
        _, residual = _match(pair.source, pair.target, pair.rotation, pair.translation)
        assert residual.max() < 1e-5
    clean = torch.as_tensor(OBJECTS[1, :1024]).double()
    def spread(pair):
        noisy = pair.source.double()
        nearest = torch.cdist(noisy, clean).argmin(dim=1)
        return float((noisy - clean[nearest]).std())
    many = [data[1] for _ in range(14)][-1]  # the 16th read of the object
    assert spread(second) > spread(first) * 1.2 and spread(many) > 3 * spread(first)
    assert np.array_equal(OBJECTS, np.random.RandomState(7).normal(size=(4, 2048, 3)).astype(np.float32))


def test_independent_sampling_uses_disjoint_halves():
    pair = RegistrationPairs(OBJECTS, "sampling")[0]
    back = (pair.target.double() - pair.translation.double()) @ pair.rotation.double()
    first, other = torch.as_tensor(OBJECTS[0, :1024]).double(), torch.as_tensor(OBJECTS[0, 1024:]).double()
    assert torch.cdist(pair.source.double(), first).min(dim=1).values.max() < 0.06
    assert torch.cdist(back, other).min(dim=1).values.max() < 0.06
    assert torch.cdist(pair.source.double(), first).min(dim=1).values.mean() > 1e-3  # noisy


@pytest.mark.parametrize("keep", [0.5, 0.7, 0.9])
def test_crop_keeps_the_stated_share_of_one_side(keep):
    points = np.random.RandomState(1).normal(size=(2048, 3))
    for seed in range(5):
        kept = crop_half_space(points, keep, np.random.RandomState(seed))
        # a percentile cut keeps the share to a point; RPM-Net cuts keep=0.5 at the centroid instead
        assert abs(len(kept) - keep * 2048) <= (0.05 * 2048 if keep == 0.5 else 2)
        # one side of a plane: a linear separator exists, found by the (known) plane draw
        rng = np.random.RandomState(seed)
        phi, cos_theta = rng.uniform(0, 2 * np.pi), rng.uniform(-1, 1)
        normal = np.array([math.sqrt(1 - cos_theta ** 2) * math.cos(phi), math.sqrt(1 - cos_theta ** 2) * math.sin(phi), cos_theta])
        side = (points - points.mean(0)) @ normal
        inside = np.isin(np.arange(2048), [np.flatnonzero((points == k).all(1))[0] for k in kept])
        assert side[inside].min() > side[~inside].max()


def test_partial_pairs_have_717_points_and_overlap_partly():
    protocol = get_protocol("partial")
    pair = RegistrationPairs(OBJECTS, protocol)[3]
    assert pair.source.shape == (717, 3) and pair.target.shape == (717, 3)
    back = (pair.target.double() - pair.translation.double()) @ pair.rotation.double()
    near = torch.cdist(pair.source.double(), back).min(dim=1).values
    assert 0.2 < float((near < 0.1).double().mean()) < 0.98  # overlap, but not full


def test_unseen_categories_split_labels():
    protocol = get_protocol("unseen")
    assert list(labels_for(protocol, "train")) == list(range(20))
    assert list(labels_for(protocol, "test")) == list(range(20, 40))
    assert labels_for(get_protocol("clean"), "test") is None


@needs_data
def test_unseen_protocol_on_the_subset():
    protocol = get_protocol("unseen")
    test = mn.load_modelnet40("test", labels=labels_for(protocol, "test"))
    train = mn.load_modelnet40("train", labels=labels_for(protocol, "train"))
    assert (test.labels >= 20).all() and (train.labels < 20).all() and len(test.labels) == 14


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="name must be one of"):
        get_protocol("noisy")
    with pytest.raises(ValueError, match="points must have shape"):
        RegistrationPairs(OBJECTS[:, :100], "clean")
    with pytest.raises(ValueError, match="item_seeds must have shape"):
        RegistrationPairs(OBJECTS, "clean", item_seeds=[1, 2])
    with pytest.raises(TypeError, match="protocol must be"):
        RegistrationPairs(OBJECTS, 3)
    with pytest.raises(ValueError, match="keep must lie in"):
        crop_half_space(OBJECTS[0], 0.0, np.random.RandomState(0))
