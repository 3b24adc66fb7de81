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

Joint positions come from :meth:`~diffcp.bodies.base.BodyModel.vertices_and_joints` (anny: its bone
heads; SMPL: its regressed joints). The default joint lists depend on the model: :data:`POSED_JOINTS`
and :data:`MEASURED_JOINTS` for anny, :data:`SMPL_POSED_JOINTS` and :data:`SMPL_MEASURED_JOINTS` for
SMPL and SMPL-X. The model's joint 0 is the root.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor


__all__ = ["BodyParameters", "PlacedBody", "POSED_JOINTS", "MEASURED_JOINTS", "vertex_normals"]

#: anny bones a pose rotates in the non-rigid experiment (the others stay at rest).
POSED_JOINTS = ("spine03", "neck01", "shoulder01.L", "shoulder01.R", "upperarm01.L", "upperarm01.R",
                "lowerarm01.L", "lowerarm01.R", "upperleg01.L", "upperleg01.R", "lowerleg01.L", "lowerleg01.R")
#: anny bones whose heads the joint error measures: the posed ones, the root and the extremities.
MEASURED_JOINTS = ("root",) + POSED_JOINTS + ("head", "wrist.L", "wrist.R", "foot.L", "foot.R")
#: the same choice for SMPL and SMPL-X (``diffcp.bodies.smplx``)
SMPL_POSED_JOINTS = ("spine2", "neck", "left_collar", "right_collar", "left_shoulder", "right_shoulder",
                     "left_elbow", "right_elbow", "left_hip", "right_hip", "left_knee", "right_knee")
SMPL_MEASURED_JOINTS = ("pelvis",) + SMPL_POSED_JOINTS + ("head", "left_wrist", "right_wrist", "left_ankle", "right_ankle")


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
        body: a :class:`~diffcp.bodies.base.BodyModel` that gives joint positions (anny, SMPL, SMPL-X).
        posed_joints: joint names the pose rotates (default: the model's list, see the module docstring).
        measured_joints: joint names whose positions :meth:`mesh` returns (default: likewise).

    Example (needs anny's cache, so not run here):
        >>> placed = PlacedBody(AnnyBody(topology=LOW_RESOLUTION))  # doctest: +SKIP
        >>> placed.mesh(placed.rest(2)).vertices.shape  # doctest: +SKIP
        torch.Size([2, 1229, 3])
    """

    def __init__(self, body, posed_joints: Optional[Sequence[str]] = None,
                 measured_joints: Optional[Sequence[str]] = None):
        labels = list(getattr(body, "joint_labels", []))
        smpl = getattr(body, "name", "") in ("smpl", "smplx")
        posed_joints = posed_joints or (SMPL_POSED_JOINTS if smpl else POSED_JOINTS)
        measured_joints = measured_joints or (SMPL_MEASURED_JOINTS if smpl else MEASURED_JOINTS)
        for name, wanted in (("posed_joints", posed_joints), ("measured_joints", measured_joints)):
            missing = [j for j in wanted if j not in labels]
            if missing or not wanted:
                raise ValueError(f"{name} must be a non-empty list of the body's joint labels; "
                                 f"{missing or 'none given'} not among them.")
        self.body = body
        self.faces = body.faces
        self.posed_joints = tuple(posed_joints)
        self.measured_joints = tuple(measured_joints)
        self._posed = torch.tensor([labels.index(j) for j in posed_joints])
        self._measured = torch.tensor([labels.index(j) for j in measured_joints])
        self.root_index = 0  # the model's root joint
        self.shape_scale, self.shape_bounds = float(body.shape_scale), body.shape_bounds
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
        """``(B, J_model, 3)`` axis-angles: ``pose (B, J, 3)`` on the posed joints, zero elsewhere."""
        full = pose.new_zeros(pose.shape[0], self.body.num_joints, 3)
        return full.index_copy(1, self._posed.to(pose.device), pose)

    def model_frame(self, pose: Tensor, shape: Tensor) -> Tuple[Tensor, Tensor]:
        """Vertices ``(B, V, 3)`` and all joint positions ``(B, J_model, 3)`` in the model's own frame."""
        if pose.dim() != 3 or pose.shape[1:] != (self.num_posed, 3):
            raise ValueError(f"pose must have shape (B, {self.num_posed}, 3); got {tuple(pose.shape)}.")
        return self.body.vertices_and_joints(self.full_pose(pose), shape)

    def mesh(self, params: BodyParameters) -> PlacedMesh:
        """Camera-frame vertices, vertex normals and measured joints of ``params``."""
        verts, heads = self.model_frame(params.pose, params.shape)
        origin = heads[:, self.root_index]
        R = params.rotation

        def place(x):
            return (x - origin[:, None]) @ R.transpose(-1, -2) + params.root[:, None]

        v = place(verts)
        return PlacedMesh(v, vertex_normals(v, self.faces), place(heads[:, self._measured]))
