"""Body models behind one interface: ``vertices(pose (B, J, 3), shape (B, S)) -> (B, V, 3)``.

- :class:`~diffcp.bodies.anny.AnnyBody`: anny (Apache-2.0), the default; offline from its wheel.
- :class:`~diffcp.bodies.smplx.SMPLBody`: SMPL / SMPL-X through ``smplx``, from model files the
  reader registered for (never downloaded; ``smplx``'s code is licensed non-commercially).

Neither package is imported until a model is constructed. :func:`load_body` picks one by name.
"""

from __future__ import annotations

from .base import BodyModel

__all__ = ["BodyModel", "load_body", "BODY_MODELS"]

BODY_MODELS = ("anny", "smpl", "smplx")


def load_body(name: str = "anny", **kwargs) -> BodyModel:
    """Construct a body model by name: ``"anny"`` (kwargs of ``AnnyBody``), ``"smpl"`` or
    ``"smplx"`` (kwargs of ``SMPLBody``).

    Example:
        >>> load_body("mesh")
        Traceback (most recent call last):
        ...
        ValueError: name must be one of ('anny', 'smpl', 'smplx'); got 'mesh'.
    """
    if name not in BODY_MODELS:
        raise ValueError(f"name must be one of {BODY_MODELS}; got {name!r}.")
    if name == "anny":
        from .anny import AnnyBody

        return AnnyBody(**kwargs)
    from .smplx import SMPLBody

    return SMPLBody(model_type=name, **kwargs)
