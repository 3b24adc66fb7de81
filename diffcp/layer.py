"""ICP as a layer: :class:`ICP` is a ``torch.nn.Module`` built from :class:`~diffcp.ICPSettings`.

The temperatures that the settings mark ``learnable=True`` (of soft correspondences and of soft
rejections) become parameters, positive by construction: the layer stores ``log T`` and passes
``exp(log T)`` to :func:`diffcp.icp`, whose three backward modes all carry the gradient to it. The
settings keep the initial values, so ``layer.settings.to_dict()`` names the ICP and
``layer.state_dict()`` holds what was learned.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .icp import ICPResult, icp, resolve_settings
from .settings import ICPSettings, SoftNearestNeighbor

__all__ = ["ICP"]


class ICP(nn.Module):
    """Differentiable ICP as a module; ``forward`` returns an :class:`~diffcp.ICPResult`.

    Args:
        settings: an :class:`~diffcp.ICPSettings`, or None to build one from ``options``.
        **options: the fields of :class:`~diffcp.ICPSettings` (strings or option objects).

    Example:
        >>> layer = ICP(correspondence=diffcp.SoftNearestNeighbor(temperature=1e-2, learnable=True),
        ...             stopping=diffcp.Stopping(max_iterations=5, tolerance=0.0))
        >>> [name for name, _ in layer.named_parameters()]
        ['log_temperatures.correspondence']
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(2, 100, 3, generator=g)
        >>> out = layer(x, x + 0.05)
        >>> out.translation.sum().backward()
        >>> layer.log_temperatures["correspondence"].grad is not None
        True
    """

    def __init__(self, settings: Optional[ICPSettings] = None, **options):
        super().__init__()
        self.settings = resolve_settings(settings, options, where="ICP")
        self.log_temperatures = nn.ParameterDict()
        corr = self.settings.correspondence
        if isinstance(corr, SoftNearestNeighbor) and corr.learnable:
            self.log_temperatures["correspondence"] = nn.Parameter(torch.tensor(math.log(corr.temperature)))
        for i, opt in enumerate(self.settings.rejection):
            if opt.learnable:
                self.log_temperatures[f"rejection_{i}"] = nn.Parameter(torch.tensor(math.log(opt.temperature)))

    @classmethod
    def from_dict(cls, data: dict) -> "ICP":
        """A layer from :meth:`ICPSettings.to_dict` output (its temperatures at their initial values)."""
        return cls(ICPSettings.from_dict(data))

    def temperatures(self) -> Dict[str, Tensor]:
        """The current learnable temperatures, ``{"correspondence" | "rejection_<i>": T}``."""
        return {name: p.exp() for name, p in self.log_temperatures.items()}

    def current_settings(self) -> ICPSettings:
        """The settings with each learnable temperature replaced by its current value (a tensor
        with gradient): what :meth:`forward` runs."""
        temps = self.temperatures()
        s = self.settings
        if "correspondence" in temps:
            s = dataclasses.replace(s, correspondence=dataclasses.replace(
                s.correspondence, temperature=temps["correspondence"], learnable=False))
        rejection = tuple(
            dataclasses.replace(opt, temperature=temps[f"rejection_{i}"], learnable=False)
            if f"rejection_{i}" in temps else opt
            for i, opt in enumerate(s.rejection)
        )
        return dataclasses.replace(s, rejection=rejection)

    def forward(self, source: Tensor, target: Tensor, init: Optional[Tensor] = None, *,
                source_normals: Optional[Tensor] = None, target_normals: Optional[Tensor] = None,
                source_lengths: Optional[Tensor] = None, target_lengths: Optional[Tensor] = None,
                source_mask: Optional[Tensor] = None) -> ICPResult:
        """Register ``source`` to ``target``; the arguments are those of :func:`diffcp.icp`."""
        settings = self.current_settings()
        if self.log_temperatures:
            settings = _on_device(settings, source)
        return icp(source, target, settings, init=init, source_normals=source_normals,
                   target_normals=target_normals, source_lengths=source_lengths,
                   target_lengths=target_lengths, source_mask=source_mask)

    def extra_repr(self) -> str:
        temps = ", ".join(f"{k}={v.detach().item():.4g}" for k, v in self.temperatures().items())
        return f"settings={self.settings!r}" + (f",\ntemperatures: {temps}" if temps else "")


def _on_device(settings: ICPSettings, like: Tensor) -> ICPSettings:
    """Tensor temperatures moved to the clouds' dtype and device (the parameters are float32)."""
    def move(opt):
        t = opt.temperature
        return dataclasses.replace(opt, temperature=t.to(like)) if isinstance(t, Tensor) else opt
    s = dataclasses.replace(settings, rejection=tuple(move(o) for o in settings.rejection))
    if isinstance(s.correspondence, SoftNearestNeighbor):
        s = dataclasses.replace(s, correspondence=move(s.correspondence))
    return s
