"""SMPL and SMPL-X through the ``smplx`` package, for readers who have the model files.

The model files are not distributed with diffcp and are never downloaded: SMPL and SMPL-X require
a (free) registration at their project sites and come under their own licences, and the ``smplx``
package's code itself is licensed for non-commercial research only. Put the files in a folder laid
out as ``smplx.create`` expects (``FOLDER/smpl/SMPL_NEUTRAL.pkl``, ``FOLDER/smplx/SMPLX_NEUTRAL.npz``,
...) and pass the folder as ``model_dir`` or set ``DIFFCP_SMPL_DIR``.

Parameters:

- pose: ``(B, J, 3)`` axis-angles; joint 0 is the global orientation, then the body joints in
  SMPL's order (SMPL: ``J = 24``; SMPL-X: ``J = 22``, hands, jaw and eyes kept at rest).
- shape: ``(B, num_betas)`` betas; zero is the template body.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from .base import BodyModel

__all__ = ["SMPLBody", "MODEL_TYPES", "JOINT_LABELS", "ENV_VAR", "resolve_model_dir"]

MODEL_TYPES = {"smpl": 24, "smplx": 22}
#: SMPL's 24 joints in its order (SMPL-X's first 22 are the same)
JOINT_LABELS = ("pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2", "left_ankle",
                "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar", "right_collar", "head",
                "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
                "left_hand", "right_hand")
ENV_VAR = "DIFFCP_SMPL_DIR"


def resolve_model_dir(model_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The folder holding the SMPL files: ``model_dir`` if given, else ``$DIFFCP_SMPL_DIR``.

    Raises:
        FileNotFoundError: when neither names an existing folder or file (with what to do).

    Example:
        >>> resolve_model_dir("/nonexistent/smpl")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: model_dir '/nonexistent/smpl' does not exist; ...
    """
    if model_dir is None:
        model_dir = os.environ.get(ENV_VAR)
        if not model_dir:
            raise FileNotFoundError(
                f"model_dir was not given and {ENV_VAR} is not set; SMPL/SMPL-X files need a registration "
                "at their project sites and are never downloaded by diffcp. Pass the folder that holds "
                "smpl/SMPL_NEUTRAL.pkl (or smplx/SMPLX_NEUTRAL.npz), or use the anny body model."
            )
    path = Path(model_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model_dir {str(path)!r} does not exist; pass the folder that holds smpl/SMPL_NEUTRAL.pkl "
            f"(or set {ENV_VAR})."
        )
    return path


class SMPLBody(BodyModel):
    """SMPL or SMPL-X (``smplx`` package) as a :class:`~diffcp.bodies.base.BodyModel`.

    Args:
        model_dir: folder (or model file) as ``smplx.create`` takes it; default ``$DIFFCP_SMPL_DIR``.
        model_type: ``"smpl"`` or ``"smplx"``.
        gender: ``"neutral"``, ``"female"`` or ``"male"`` (which file is read).
        num_betas: number of shape parameters.
        dtype: ``torch.float32`` or ``torch.float64``.
        **kwargs: passed to ``smplx.create`` (e.g. ``vertex_ids=`` for a non-standard mesh).

    Example (needs the registered model files):
        >>> body = SMPLBody("~/models", model_type="smpl")  # doctest: +SKIP
        >>> body.vertices().shape  # doctest: +SKIP
        torch.Size([1, 6890, 3])
    """

    def __init__(self, model_dir: Optional[Union[str, os.PathLike]] = None, *, model_type: str = "smpl",
                 gender: str = "neutral", num_betas: int = 10, dtype: torch.dtype = torch.float32, **kwargs):
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {tuple(MODEL_TYPES)}; got {model_type!r}.")
        if gender not in ("neutral", "female", "male"):
            raise ValueError(f"gender must be 'neutral', 'female' or 'male'; got {gender!r}.")
        if isinstance(num_betas, bool) or not isinstance(num_betas, int) or num_betas < 1:
            raise ValueError(f"num_betas must be a positive integer; got {num_betas!r}.")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64; got {dtype}.")
        path = resolve_model_dir(model_dir)
        import smplx  # deferred: an optional dependency with a non-commercial licence

        extra = {"use_pca": False} if model_type == "smplx" else {}
        self.model = smplx.create(str(path), model_type=model_type, gender=gender, num_betas=num_betas,
                                  dtype=dtype, **extra, **kwargs)
        self.name = model_type
        self.dtype = dtype
        self.faces = torch.as_tensor(self.model.faces.astype("int64"))
        self.num_joints = MODEL_TYPES[model_type]
        self.joint_labels = JOINT_LABELS[:self.num_joints]
        self.num_shape_parameters = int(self.model.num_betas)
        self.num_vertices = int(self.model.v_template.shape[0])

    def _vertices(self, pose: Tensor, shape: Tensor) -> Tensor:
        return self._vertices_and_joints(pose, shape)[0]

    def _vertices_and_joints(self, pose: Tensor, shape: Tensor):
        B = pose.shape[0]
        out = self.model(betas=shape, global_orient=pose[:, 0], body_pose=pose[:, 1:].reshape(B, -1),
                         transl=torch.zeros(B, 3, dtype=pose.dtype, device=pose.device))
        return out.vertices, out.joints[:, :self.num_joints]
