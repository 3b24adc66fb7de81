"""Step 1 of ICP: choose which source points take part (boolean masks).

Every function returns a ``(B, N)`` bool mask over a padded batch of ``B`` clouds of ``N`` points
(``N`` is the padded size); padding (index ``>= lengths[b]``) is always ``False``. A mask is not
differentiable and needs no gradient: it only decides which residuals the later steps weigh.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import checks

__all__ = ["select_all", "select_random", "select_mask"]


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value}.")
    return value


def _check_lengths(lengths, size: int) -> Tensor:
    if not isinstance(lengths, Tensor):
        raise TypeError(f"lengths must be a torch.Tensor of shape (B,); got {type(lengths).__name__}.")
    if lengths.dim() != 1:
        raise ValueError(f"lengths must have shape (B,), one length per cloud; got {tuple(lengths.shape)}.")
    return checks.check_lengths("lengths", lengths, lengths.shape[0], size, lengths.device)


def select_all(lengths: Tensor, size: int) -> Tensor:
    """Select every valid point of every cloud.

    Args:
        lengths: ``(B,)`` integer number of valid points per cloud, each in ``[1, size]``.
        size: the padded number of points ``N``.

    Returns:
        ``(B, N)`` bool, True exactly for the first ``lengths[b]`` points of cloud ``b``.

    Example:
        >>> select_all(torch.tensor([2, 3]), 3)
        tensor([[ True,  True, False],
                [ True,  True,  True]])
    """
    size = _check_size("size", size)
    lengths = _check_lengths(lengths, size)
    return checks.lengths_mask(lengths, size)


def select_random(
    lengths: Tensor, size: int, num: int, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Select ``num`` valid points per cloud uniformly at random, without replacement.

    Every cloud draws independently; a cloud with ``lengths[b] <= num`` keeps all its points.
    The draw gives every valid point an independent uniform key (padding gets a key above all of
    them) and keeps the ``num`` smallest keys of each row, so every ``num``-subset of the valid
    points is equally likely. Keys are float64, so ties are negligible even for millions of points.

    Args:
        lengths: ``(B,)`` integer number of valid points per cloud, each in ``[1, size]``.
        size: the padded number of points ``N``.
        num: how many points to keep per cloud (positive).
        generator: optional ``torch.Generator`` on the device of ``lengths``; with it the result is
            deterministic.

    Returns:
        ``(B, N)`` bool mask with ``min(num, lengths[b])`` True entries in row ``b``, all valid.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> select_random(torch.tensor([5, 2]), 5, 3, generator=g).sum(1)
        tensor([3, 2])
    """
    size = _check_size("size", size)
    num = _check_size("num", num)
    lengths = _check_lengths(lengths, size)
    valid = checks.lengths_mask(lengths, size)
    if num >= size:
        return valid
    keys = torch.rand(lengths.shape[0], size, generator=generator, dtype=torch.float64, device=lengths.device)
    keys = keys.masked_fill(~valid, 2.0)  # padding sorts after every valid point
    chosen = keys.topk(num, dim=1, largest=False, sorted=False).indices
    mask = torch.zeros_like(valid).scatter_(1, chosen, True)
    return mask & valid


def select_mask(mask: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
    """Validate a user-supplied selection and clear its padding entries.

    Args:
        mask: ``(B, N)`` bool, True for the points to use.
        lengths: optional ``(B,)`` integer number of valid points per cloud; ``None`` means all
            ``N`` points are valid.

    Returns:
        ``(B, N)`` bool, ``mask`` with padding set to False.

    Raises:
        TypeError: ``mask`` is not a bool tensor.
        ValueError: ``mask`` is not 2-D, ``lengths`` does not match it, or (while
            ``diffcp.checks.ENABLED``) a cloud has no selected valid point.

    Example:
        >>> select_mask(torch.tensor([[True, False, True]]), torch.tensor([2]))
        tensor([[ True, False, False]])
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor of shape (B, N); got {type(mask).__name__}.")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool; got {mask.dtype}.")
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape (B, N); got {tuple(mask.shape)}.")
    batch, size = mask.shape
    if size < 1 or batch < 1:
        raise ValueError(f"mask must hold at least one cloud of at least one point; got {tuple(mask.shape)}.")
    if lengths is not None:
        if isinstance(lengths, Tensor) and lengths.dim() != 1:
            raise ValueError(f"lengths must have shape ({batch},), one length per cloud; got {tuple(lengths.shape)}.")
        lengths = checks.check_lengths("lengths", lengths, batch, size, mask.device)
        mask = mask & checks.lengths_mask(lengths, size)
    if checks.ENABLED:
        empty = ~mask.any(dim=1)
        if bool(empty.any()):
            rows = empty.nonzero().flatten().tolist()
            raise ValueError(f"mask must select at least one valid point in every cloud; clouds {rows} select none.")
    return mask
