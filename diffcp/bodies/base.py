"""The one interface every body model implements: vertices from pose and shape parameters.

A body model maps a batch of poses and shapes to posed meshes that share one triangle list:

- ``pose``: ``(B, J, 3)`` axis-angle rotations, one per joint (joint 0 is the root), in the
  model's own joint order; ``None`` means the rest pose. A model may accept more forms (anny also
  takes its ``(B, J, 4, 4)`` per-bone transforms).
- ``shape``: ``(B, S)`` shape parameters (SMPL's betas, anny's phenotype values in ``[0, 1]``);
  ``None`` means the model's default body.
- the result: ``(B, V, 3)`` vertices in metres, in the model's own world frame.

``faces`` is ``(F, 3)`` int64, counter-clockwise seen from outside. Subclasses implement
``_vertices``; :meth:`BodyModel.vertices` validates the arguments first.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["BodyModel"]


class BodyModel:
    """Abstract body model: ``vertices(pose (B, J, 3), shape (B, S)) -> (B, V, 3)``.

    Attributes:
        name: a short name ("anny", "smpl", ...).
        faces: ``(F, 3)`` int64 triangle indices.
        num_joints: ``J``, the joints a pose rotates.
        num_shape_parameters: ``S``, the length of a shape vector.
        num_vertices: ``V``.
        dtype: dtype of the vertices produced.
    """

    name: str = "body"
    faces: Tensor
    num_joints: int
    num_shape_parameters: int
    num_vertices: int
    dtype: torch.dtype = torch.float32
    #: names of the joints a pose rotates, in its order (joint 0 is the root)
    joint_labels: Sequence[str] = ()
    #: spread of the shape parameters about :meth:`default_shape` (the scale of a shape prior)
    shape_scale: float = 1.0
    #: ``(low, high)`` bounds of every shape parameter, or None when unbounded
    shape_bounds: Optional[Tuple[float, float]] = None
    #: the model frame's up direction and the direction the body faces in the rest pose
    up_axis: Tuple[float, float, float] = (0.0, 1.0, 0.0)
    front_axis: Tuple[float, float, float] = (0.0, 0.0, 1.0)

    def default_shape(self, batch_size: int = 1) -> Tensor:
        """The shape parameters of the default body, ``(batch_size, S)``."""
        return torch.zeros(batch_size, self.num_shape_parameters, dtype=self.dtype)

    def rest_pose(self, batch_size: int = 1) -> Tensor:
        """The rest pose as axis-angles, ``(batch_size, J, 3)`` zeros."""
        return torch.zeros(batch_size, self.num_joints, 3, dtype=self.dtype)

    def vertices(self, pose: Optional[Tensor] = None, shape: Optional[Tensor] = None) -> Tensor:
        """Posed vertices ``(B, V, 3)`` for ``pose (B, J, 3)`` and ``shape (B, S)``.

        Either argument may be ``None`` (rest pose, default shape); the batch size is taken from
        the one given (both must agree when both are given). Differentiable in both.
        """
        pose, shape = self._check_arguments(pose, shape)
        return self._vertices(pose, shape)

    def _vertices(self, pose: Tensor, shape: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def vertices_and_joints(self, pose: Optional[Tensor] = None, shape: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Vertices ``(B, V, 3)`` and joint positions ``(B, J, 3)`` (in the order of
        :attr:`joint_labels`) for ``pose (B, J, 3)`` and ``shape (B, S)``; differentiable in both."""
        pose, shape = self._check_arguments(pose, shape)
        return self._vertices_and_joints(pose, shape)

    def _vertices_and_joints(self, pose: Tensor, shape: Tensor) -> Tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError(f"the {self.name} body model gives no joint positions.")

    def _pose_forms(self) -> Tuple[Tuple[int, ...], ...]:
        """Per-sample shapes a pose may have; subclasses may add forms."""
        return ((self.num_joints, 3),)

    def _check_arguments(self, pose, shape) -> Tuple[Tensor, Tensor]:
        for name, value in (("pose", pose), ("shape", shape)):
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None; got {type(value).__name__}.")
            if value is not None and not value.is_floating_point():
                raise TypeError(f"{name} must have a floating-point dtype; got {value.dtype}.")
        forms = self._pose_forms()
        if pose is not None and (pose.dim() < 2 or tuple(pose.shape[1:]) not in forms):
            wanted = " or ".join(str(("B",) + f) for f in forms)
            raise ValueError(f"pose must have shape {wanted}; got {tuple(pose.shape)}.")
        S = self.num_shape_parameters
        if shape is not None and (shape.dim() != 2 or shape.shape[1] != S):
            raise ValueError(f"shape must have shape (B, {S}); got {tuple(shape.shape)}.")
        if pose is not None and shape is not None and pose.shape[0] != shape.shape[0]:
            raise ValueError(
                f"pose and shape must have the same batch size; got {pose.shape[0]} and {shape.shape[0]}."
            )
        batch = pose.shape[0] if pose is not None else (shape.shape[0] if shape is not None else 1)
        if batch == 0:
            raise ValueError("pose and shape must hold at least one body; got batch size 0.")
        pose = self.rest_pose(batch) if pose is None else pose.to(self.dtype)
        shape = self.default_shape(batch) if shape is None else shape.to(self.dtype)
        return pose, shape

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, vertices={self.num_vertices}, "
                f"faces={self.faces.shape[0]}, joints={self.num_joints}, shape={self.num_shape_parameters})")
