"""Where released checkpoints live, and how they are read (never copied into the repository).

``weights_folder()`` is ``$DIFFCP_WEIGHTS`` if set, else ``../shared/weights`` next to the
repository. Checkpoints are plain ``state_dict`` s read with ``torch.load(..., map_location="cpu",
weights_only=True)`` (the released files were saved on CUDA; ``weights_only`` refuses pickled code).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Union

import torch

__all__ = ["weights_folder", "weights_path", "read_state_dict"]


def weights_folder() -> Path:
    """``$DIFFCP_WEIGHTS`` if set, else ``../shared/weights`` next to the repository."""
    root = os.environ.get("DIFFCP_WEIGHTS")
    return Path(root) if root else Path(__file__).resolve().parents[2].parent / "shared" / "weights"


def weights_path(name: str, path: Optional[Union[str, os.PathLike]] = None) -> Path:
    """``path`` if given, else ``weights_folder() / name``; ``FileNotFoundError`` if it is absent."""
    resolved = Path(path) if path is not None else weights_folder() / name
    if not resolved.is_file():
        raise FileNotFoundError(
            f"The checkpoint {name} is not at {resolved}; pass path=, or set DIFFCP_WEIGHTS to the folder "
            "holding the released checkpoints (see ../shared/weights/README.md).")
    return resolved


def read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """A plain state_dict from ``path``, on the CPU, without unpickling code."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"path must hold a plain state_dict; {path} holds a {type(state).__name__}.")
    return state
