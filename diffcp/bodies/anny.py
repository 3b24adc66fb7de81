"""The anny body model (NAVER Labs, Apache-2.0), offline from its pip wheel.

anny ships its mesh, rig and blend shapes inside the wheel; nothing is downloaded as long as the
topology is one of :data:`TOPOLOGIES` (anny's ``"smpl"`` and ``"smplx"`` topologies download a
non-commercial archive and are refused here). The first construction of a topology builds a cache
(about 1-3 minutes, ~1.8 GB peak memory, ~790 MB on disk for the full mesh) in
:func:`default_cache_dir`; later constructions read it in about a second.

Parameters, as anny takes them:

- pose: ``(B, J, 3)`` axis-angle rotation per bone (``J = 104`` with anny's default rig), turned
  into anny's per-bone ``(B, J, 4, 4)`` transforms with zero translation; or those ``(B, J, 4, 4)``
  transforms directly. Zero rotation is the rest pose. Bone order: :attr:`AnnyBody.bone_labels`.
- shape: ``(B, 6)`` phenotype values in ``[0, 1]`` in the order of :attr:`AnnyBody.shape_labels`
  (gender, age, muscle, weight, height, proportions); ``0.5`` everywhere is the default body.

Vertices are in metres. Full mesh: 13,718 vertices, 27,420 triangles (watertight);
``topology=LOW_RESOLUTION`` gives 1,229 vertices.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ..geometry import so3_exp
from .base import BodyModel

__all__ = ["AnnyBody", "TOPOLOGIES", "LOW_RESOLUTION", "default_cache_dir"]

TOPOLOGIES = ("anny", "notoes", "notoes_collapse3pc", "notoes_collapse5pc", "notoes_collapse10pc")
LOW_RESOLUTION = "notoes_collapse10pc"
SKINNING = ("lbs", "dqs", "warp_lbs")


def default_cache_dir() -> Path:
    """Where anny's cache lives: ``$ANNY_CACHE_DIR``, else ``$DIFFCP_CACHE_DIR/anny``, else
    ``~/.cache/diffcp/anny`` (outside any repository).

    Example:
        >>> default_cache_dir().is_absolute()
        True
    """
    if os.environ.get("ANNY_CACHE_DIR"):
        return Path(os.environ["ANNY_CACHE_DIR"]).expanduser().resolve()
    root = os.environ.get("DIFFCP_CACHE_DIR") or os.path.join("~", ".cache", "diffcp")
    return Path(root).expanduser().resolve() / "anny"


class AnnyBody(BodyModel):
    """anny as a :class:`~diffcp.bodies.base.BodyModel`.

    Args:
        topology: one of :data:`TOPOLOGIES`; ``"anny"`` is the full mesh, :data:`LOW_RESOLUTION`
            (``"notoes_collapse10pc"``) about a tenth of it.
        skinning: anny's skinning method: ``"lbs"`` (pure torch, the default here), ``"dqs"`` or
            ``"warp_lbs"`` (compiles a warp kernel on first use).
        cache_dir: anny's cache folder; default :func:`default_cache_dir`.
        dtype: ``torch.float32`` or ``torch.float64``.

    Example (the first construction takes minutes, so it is not run here):
        >>> body = AnnyBody(topology=LOW_RESOLUTION)  # doctest: +SKIP
        >>> body.vertices().shape  # doctest: +SKIP
        torch.Size([1, 1229, 3])
    """

    def __init__(self, topology: str = "anny", *, skinning: str = "lbs",
                 cache_dir: Optional[Union[str, os.PathLike]] = None, dtype: torch.dtype = torch.float32):
        if not isinstance(topology, str) or topology not in TOPOLOGIES:
            hint = (" anny's 'smpl' and 'smplx' topologies download non-commercial files and are not offered;"
                    " use diffcp.bodies.smplx for SMPL models." if topology in ("smpl", "smplx") else "")
            raise ValueError(f"topology must be one of {TOPOLOGIES}; got {topology!r}.{hint}")
        if skinning not in SKINNING:
            raise ValueError(f"skinning must be one of {SKINNING}; got {skinning!r}.")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64; got {dtype}.")
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("ANNY_CACHE_DIR", str(cache))
        import anny  # deferred: a heavy import, and an optional dependency
        import anny.paths

        anny.paths.set_anny_cache_path(cache)
        self.model = anny.Anny(topology=topology, skinning_method=skinning).to(dtype)
        self.name = "anny" if topology == "anny" else f"anny-{topology}"
        self.topology = topology
        self.cache_dir = cache
        self.dtype = dtype
        self.faces = torch.as_tensor(self.model.faces, dtype=torch.int64).clone()
        self.bone_labels = list(self.model.bone_labels)
        self.shape_labels = list(self.model.phenotype_labels)
        self.joint_labels = self.bone_labels
        self.shape_scale, self.shape_bounds = 0.29, (0.0, 1.0)  # the spread of a uniform value in [0, 1]
        self.up_axis, self.front_axis = (0.0, 0.0, 1.0), (0.0, -1.0, 0.0)  # anny is z-up and faces -y
        self.num_joints = len(self.bone_labels)
        self.num_shape_parameters = len(self.shape_labels)
        self.num_vertices = int(self.model.template_vertices.shape[0])

    def default_shape(self, batch_size: int = 1) -> Tensor:
        """anny's default body: every phenotype value at 0.5, ``(batch_size, 6)``."""
        return torch.full((batch_size, self.num_shape_parameters), 0.5, dtype=self.dtype)

    def _pose_forms(self) -> Tuple[Tuple[int, ...], ...]:
        return ((self.num_joints, 3), (self.num_joints, 4, 4))

    def _vertices(self, pose: Tensor, shape: Tensor) -> Tensor:
        return self.model(pose_parameters=_transforms(pose), phenotype_kwargs=shape)["vertices"]

    def _vertices_and_joints(self, pose: Tensor, shape: Tensor) -> Tuple[Tensor, Tensor]:
        out = self.model(pose_parameters=_transforms(pose), phenotype_kwargs=shape)
        return out["vertices"], out["bone_poses"][..., :3, 3]  # joint position = the bone's head


def _transforms(pose: Tensor) -> Tensor:
    """anny's ``(B, J, 4, 4)`` per-bone transforms from ``(B, J, 3)`` axis-angles (or passed through)."""
    if pose.shape[-1] == 3 and pose.dim() == 3:
        transforms = torch.zeros(pose.shape[:2] + (4, 4), dtype=pose.dtype, device=pose.device)
        transforms[..., :3, :3] = so3_exp(pose)
        transforms[..., 3, 3] = 1.0
        return transforms
    return pose
