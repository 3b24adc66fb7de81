"""A progress bar for the experiments' long loops: tqdm when it is installed and wanted."""

from __future__ import annotations

from typing import Iterable


def progress_bar(iterable: Iterable, desc: str, enabled: bool) -> Iterable:
    """``iterable`` wrapped in a tqdm bar labelled ``desc`` (left on screen only while it runs);
    ``iterable`` itself when ``enabled`` is false or tqdm is not installed."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return iterable
    return tqdm(iterable, desc=desc, leave=False)
