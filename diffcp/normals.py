"""Surface normals by PCA over the k nearest neighbours, oriented and differentiable.

The normal of a point is the eigenvector of the smallest eigenvalue of the covariance of its
``k`` nearest neighbours (the point itself included). The neighbour indices come from
:func:`diffcp.search.knn` and are not differentiable; the covariance, and through it the normal,
is. The eigenvector's gradient ``sum_j v_j v_j^T dC v_0 / (l_0 - l_j)`` only involves the gaps
to the smallest eigenvalue; those are bounded away from zero so that a degenerate neighbourhood
gives a large but finite gradient, never NaN.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import checks
from .search import gather_points, knn

__all__ = ["estimate_normals", "smallest_eigenvector"]

ORIENTATIONS = ("outward", "viewpoint")


class _SmallestEigenvector(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cov: Tensor) -> Tensor:
        evals, evecs = torch.linalg.eigh(cov)
        ctx.save_for_backward(evals, evecs)
        return evecs[..., 0]

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        evals, evecs = ctx.saved_tensors
        gap = evals[..., :1] - evals[..., 1:]  # (..., 2), <= 0
        floor = torch.finfo(evals.dtype).eps * evals.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(evals.dtype).tiny)
        gap = torch.minimum(gap, -floor)
        others = evecs[..., 1:]  # (..., 3, 2)
        coef = (grad[..., None, :] @ others)[..., 0, :] / gap  # (..., 2)
        g = (others @ coef[..., :, None]) @ evecs[..., :, 0][..., None, :]  # sum_j c_j v_j v_0^T
        return (g + g.transpose(-1, -2)) / 2


def smallest_eigenvector(cov: Tensor) -> Tensor:
    """Unit eigenvector of the smallest eigenvalue of symmetric ``cov (..., 3, 3)`` (sign arbitrary).

    Differentiable with a gradient that stays finite when the eigenvalues are (nearly) repeated.
    """
    return _SmallestEigenvector.apply(cov)


def estimate_normals(
    points: Tensor,
    lengths: Optional[Tensor] = None,
    k: int = 16,
    orient: Optional[str] = "outward",
    viewpoint: Optional[Tensor] = None,
) -> Tensor:
    """Unit normals by PCA over each point's ``k`` nearest neighbours (the point included).

    Args:
        points: ``(B, N, 3)`` or ``(N, 3)``.
        lengths: optional ``(B,)`` int64 valid point counts; padded rows get a zero normal.
        k: neighbourhood size, ``3 <= k <= min(lengths)``.
        orient: ``"outward"`` (pointing away from the cloud's centroid of valid points),
            ``"viewpoint"`` (pointing towards ``viewpoint``) or ``None`` (sign as the eigensolver
            returns it).
        viewpoint: ``(B, 3)`` or ``(3,)`` for ``orient="viewpoint"``; default the origin.

    Returns:
        ``(B, N, 3)`` unit normals (``(N, 3)`` for unbatched input), differentiable in ``points``.

    Example:
        >>> g = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
        >>> plane = torch.cat([g.reshape(-1, 2), torch.zeros(16, 1)], -1)
        >>> n = estimate_normals(plane, k=6, orient="viewpoint", viewpoint=torch.tensor([0.0, 0.0, 5.0]))
        >>> bool(torch.allclose(n, torch.tensor([0.0, 0.0, 1.0]).expand(16, 3)))
        True
    """
    points, unbatched = checks.as_batched_points("points", points, min_points=3)
    if orient is not None:
        checks.check_option("orient", orient, ORIENTATIONS)
    B, N, _ = points.shape
    lengths = checks.check_lengths("lengths", lengths, B, N, points.device)
    if isinstance(k, bool) or not isinstance(k, int) or k < 3:
        raise ValueError(f"k must be an integer of at least 3 (a plane needs 3 points); got {k!r}.")
    valid = checks.lengths_mask(lengths, N)

    indices = knn(points, points, lengths, lengths, k=k).indices  # raises if k > min(lengths)
    nb = gather_points(points, indices)  # (B, N, k, 3)
    centred = nb - nb.mean(2, keepdim=True)
    cov = centred.transpose(-1, -2) @ centred / k  # (B, N, 3, 3)
    # Padded rows: a well-conditioned stand-in keeps the eigensolver and its gradient finite.
    stand_in = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=points.dtype, device=points.device))
    cov = torch.where(valid[..., None, None], cov, stand_in)
    normals = smallest_eigenvector(cov)

    if orient is not None:
        if orient == "outward":
            w = valid.to(points.dtype)[..., None]
            centroid = (points * w).sum(1, keepdim=True) / lengths.to(points.dtype)[:, None, None]
            direction = points - centroid
        else:
            if viewpoint is None:
                vp = torch.zeros(B, 1, 3, dtype=points.dtype, device=points.device)
            else:
                if not isinstance(viewpoint, Tensor):
                    raise TypeError(f"viewpoint must be a torch.Tensor of shape (B, 3) or (3,); got {type(viewpoint).__name__}.")
                if viewpoint.shape not in ((3,), (1, 3), (B, 3)):
                    raise ValueError(f"viewpoint must have shape (3,) or ({B}, 3); got {tuple(viewpoint.shape)}.")
                vp = viewpoint.to(points.dtype).reshape(-1, 1, 3).expand(B, 1, 3)
            direction = vp - points
        flip = (normals * direction.detach()).sum(-1, keepdim=True) < 0
        normals = torch.where(flip, -normals, normals)
    normals = normals * valid[..., None].to(points.dtype)
    return normals[0] if unbatched else normals
