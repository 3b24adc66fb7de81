"""A body placed in a camera frame: the parameters a non-rigid fit estimates, and the mesh they give.

A :class:`BodyParameters` holds, for a batch of ``B`` bodies,

- ``rotation`` ``(B, 3, 3)``: the rotation taking the body model's world frame into the camera frame;
- ``root`` ``(B, 3)``: where the model's root joint lies in the camera frame (metres);
- ``pose`` ``(B, J, 3)``: axis-angle rotations of ``J`` chosen joints (:attr:`PlacedBody.posed_joints`);
  every other joint of the model stays at rest;
- ``shape`` ``(B, S)``: the model's shape parameters (anny: phenotype values in ``[0, 1]``).

:class:`PlacedBody` turns them into camera-frame vertices ``(B, V, 3)``, vertex normals and the
positions of :attr:`PlacedBody.measured_joints` (for the joint error): ``x_cam = R (x - root_world)
+ root``, where ``root_world`` is the root joint of the posed body in the model's frame. Fixing the
root rather than the model's origin keeps the translation independent of shape and pose.

Only anny gives joint positions here (its ``bone_poses``); the default joint lists name anny bones.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..geometry import so3_exp

__all__ = ["BodyParameters", "PlacedBody", "POSED_JOINTS", "MEASURED_JOINTS", "vertex_normals"]

#: anny bones a pose rotates in the non-rigid experiment (the others stay at rest).
POSED_JOINTS = ("spine03", "neck01", "shoulder01.L", "shoulder01.R", "upperarm01.L", "upperarm01.R",
                "lowerarm01.L", "lowerarm01.R", "upperleg01.L", "upperleg01.R", "lowerleg01.L", "lowerleg01.R")
#: anny bones whose heads the joint error measures: the posed ones, the root and the extremities.
MEASURED_JOINTS = ("root",) + POSED_JOINTS + ("head", "wrist.L", "wrist.R", "foot.L", "foot.R")


class BodyParameters(NamedTuple):
    """Rigid placement, pose and shape of ``B`` bodies (see the module docstring for shapes)."""

    rotation: Tensor
    root: Tensor
    pose: Tensor
    shape: Tensor

    def detach(self) -> "BodyParameters":
        return BodyParameters(*(x.detach() for x in self))

    def index(self, i) -> "BodyParameters":
        return BodyParameters(*(x[i] for x in self))


class PlacedMesh(NamedTuple):
    """Camera-frame vertices ``(B, V, 3)``, unit vertex normals ``(B, V, 3)``, joints ``(B, M, 3)``."""

    vertices: Tensor
    normals: Tensor
    joints: Tensor


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """Area-weighted unit vertex normals ``(B, V, 3)`` of meshes ``vertices (B, V, 3)``, ``faces (F, 3)``
    (counter-clockwise seen from outside gives outward normals). Differentiable.

    Example:
        >>> v = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0, 1, 0]]])
        >>> vertex_normals(v, torch.tensor([[0, 1, 2]]))[0, 0]
        tensor([0., 0., 1.])
    """
    a, b, c = (vertices[:, faces[:, k]] for k in range(3))
    face_n = torch.linalg.cross(b - a, c - a, dim=-1)  # length = twice the area
    n = torch.zeros_like(vertices)
    for k in range(3):
        n = n.index_add(1, faces[:, k], face_n)
    return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class PlacedBody:
    """A body model posed through a few joints and placed in a camera frame.

    Args:
        body: a :class:`~diffcp.bodies.anny.AnnyBody` (any topology).
        posed_joints: bone names the pose rotates (default :data:`POSED_JOINTS`).
        measured_joints: bone names whose heads :meth:`mesh` returns (default :data:`MEASURED_JOINTS`).

    Example (needs anny's cache, so not run here):
        >>> placed = PlacedBody(AnnyBody(topology=LOW_RESOLUTION))  # doctest: +SKIP
        >>> placed.mesh(placed.rest(2)).vertices.shape  # doctest: +SKIP
        torch.Size([2, 1229, 3])
    """

    def __init__(self, body, posed_joints: Sequence[str] = POSED_JOINTS,
                 measured_joints: Sequence[str] = MEASURED_JOINTS):
        labels = list(getattr(body, "bone_labels", []))
        for name, wanted in (("posed_joints", posed_joints), ("measured_joints", measured_joints)):
            missing = [j for j in wanted if j not in labels]
            if missing or not wanted:
                raise ValueError(f"{name} must be a non-empty list of the body's bone labels; "
                                 f"{missing or 'none given'} not among them.")
        self.body = body
        self.faces = body.faces
        self.posed_joints = tuple(posed_joints)
        self.measured_joints = tuple(measured_joints)
        self._posed = torch.tensor([labels.index(j) for j in posed_joints])
        self._measured = torch.tensor([labels.index(j) for j in measured_joints])
        self.root_index = labels.index("root")  # the model's root bone
        self.num_posed = len(self.posed_joints)

    def rest(self, batch_size: int = 1, rotation: Optional[Tensor] = None, root: Optional[Tensor] = None) -> BodyParameters:
        """The mean body in the rest pose, placed by ``rotation (B, 3, 3)`` and ``root (B, 3)``
        (default: identity and the origin)."""
        dt = self.body.dtype
        given = rotation if rotation is not None else root
        dev = given.device if given is not None else None
        rot = torch.eye(3, dtype=dt, device=dev).expand(batch_size, 3, 3).clone() if rotation is None else rotation
        rt = torch.zeros(batch_size, 3, dtype=dt, device=dev) if root is None else root
        return BodyParameters(rot, rt, torch.zeros(batch_size, self.num_posed, 3, dtype=dt, device=dev),
                              self.body.default_shape(batch_size).to(dev))

    def full_pose(self, pose: Tensor) -> Tensor:
        """``(B, J_model, 4, 4)`` per-bone transforms with ``pose (B, J, 3)`` on the posed joints."""
        B = pose.shape[0]
        rot = torch.eye(3, dtype=pose.dtype, device=pose.device).expand(B, self.body.num_joints, 3, 3)
        rot = rot.index_copy(1, self._posed.to(pose.device), so3_exp(pose))
        bottom = torch.zeros(B, self.body.num_joints, 1, 4, dtype=pose.dtype, device=pose.device)
        bottom[..., 3] = 1.0
        top = torch.cat([rot, torch.zeros_like(rot[..., :1])], dim=-1)
        return torch.cat([top, bottom], dim=-2)

    def model_frame(self, pose: Tensor, shape: Tensor) -> Tuple[Tensor, Tensor]:
        """Vertices ``(B, V, 3)`` and all bone heads ``(B, J_model, 3)`` in the model's own frame."""
        if pose.dim() != 3 or pose.shape[1:] != (self.num_posed, 3):
            raise ValueError(f"pose must have shape (B, {self.num_posed}, 3); got {tuple(pose.shape)}.")
        self.body._check_arguments(None, shape)
        out = self.body.model(pose_parameters=self.full_pose(pose), phenotype_kwargs=shape)
        return out["vertices"], out["bone_poses"][..., :3, 3]

    def mesh(self, params: BodyParameters) -> PlacedMesh:
        """Camera-frame vertices, vertex normals and measured joints of ``params``."""
        verts, heads = self.model_frame(params.pose, params.shape)
        origin = heads[:, self.root_index]
        R = params.rotation

        def place(x):
            return (x - origin[:, None]) @ R.transpose(-1, -2) + params.root[:, None]

        v = place(verts)
        return PlacedMesh(v, vertex_normals(v, self.faces), place(heads[:, self._measured]))
