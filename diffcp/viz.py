"""One plotting style for the book: matplotlib settings and interactive plotly point clouds.

matplotlib and plotly are optional dependencies (``pip install "diffcp-icp[book]"``); they are imported
only when a function here needs them. Clouds follow the library's convention: a cloud is an
``(N, 3)`` tensor or array, or one ``(B, N, 3)`` batch element; padded points can be cut off with
``lengths``.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence

__all__ = ["PALETTE", "use_book_style", "plot_clouds", "show_plotly", "matplotlib_clouds"]

#: Colours of the first clouds in every figure: source, target, aligned source, extra.
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")

_PLOTLYJS_SHOWN = False
_FIGURE_COUNT = 0


def _require(module: str, feature: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"diffcp.viz.{feature} needs the optional package '{module.split('.')[0]}'; "
            'install it with `pip install "diffcp-icp[book]"` (or `pip install matplotlib plotly`).'
        ) from err


def _as_numpy_cloud(name: str, cloud, length: Optional[int] = None):
    import numpy as np

    try:
        import torch

        if isinstance(cloud, torch.Tensor):
            cloud = cloud.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    arr = np.asarray(cloud, dtype=np.float64)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3) or (1, N, 3); got {tuple(arr.shape)}.")
    if length is not None:
        arr = arr[: int(length)]
    return arr


def use_book_style() -> None:
    """Set matplotlib's rcParams to the book's style (deterministic output).

    Fixes the figure size, resolution, fonts, colour cycle, grid and the SVG/PNG metadata so that
    re-running a chapter produces the same images. Call it once in a chapter's setup cell.

    Example:
        >>> use_book_style()
        >>> import matplotlib
        >>> matplotlib.rcParams["figure.dpi"]
        100.0
    """
    mpl = _require("matplotlib", "use_book_style")
    from cycler import cycler

    mpl.rcdefaults()
    mpl.rcParams.update(
        {
            "figure.figsize": (6.4, 4.0),
            "figure.dpi": 100.0,
            "savefig.dpi": 100.0,
            "savefig.bbox": "tight",
            "font.size": 10.0,
            "font.family": "DejaVu Sans",
            "axes.titlesize": 11.0,
            "axes.labelsize": 10.0,
            "axes.grid": True,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.prop_cycle": cycler(color=list(PALETTE)),
            "grid.alpha": 0.3,
            "legend.frameon": False,
            "lines.linewidth": 1.6,
            "image.cmap": "viridis",
            "svg.hashsalt": "diffcp",
            "path.simplify": True,
        }
    )
    try:  # inline backend: no version string in PNG metadata
        ip = sys.modules.get("IPython")
        shell = ip.get_ipython() if ip is not None else None
        if shell is not None:
            shell.run_line_magic("config", "InlineBackend.print_figure_kwargs = {'bbox_inches': 'tight', 'metadata': {'Software': None}}")
    except Exception:  # pragma: no cover - outside IPython
        pass


def plot_clouds(*clouds, labels: Optional[Sequence[str]] = None, title: Optional[str] = None,
                lengths: Optional[Sequence[Optional[int]]] = None, size: float = 2.0, colors: Optional[Sequence[str]] = None):
    """Draw point clouds as an interactive 3-D plotly scatter plot with equal axes.

    Args:
        *clouds: one or more clouds, each ``(N, 3)`` (or ``(1, N, 3)``), as tensors or arrays.
        labels: a legend name per cloud; default ``"cloud 0"``, ``"cloud 1"``, ...
        title: figure title.
        lengths: per cloud, the number of valid points (padding after it is not drawn), or None.
        size: marker size in pixels.
        colors: a colour per cloud; default :data:`PALETTE`.

    Returns:
        A ``plotly.graph_objects.Figure``; display it with :func:`show_plotly`.

    Example:
        >>> import torch
        >>> fig = plot_clouds(torch.zeros(4, 3), torch.ones(5, 3), labels=["a", "b"])
        >>> [trace.name for trace in fig.data]
        ['a', 'b']
    """
    go = _require("plotly.graph_objects", "plot_clouds")
    if not clouds:
        raise ValueError("plot_clouds needs at least one cloud; got none.")
    n = len(clouds)
    if labels is None:
        labels = [f"cloud {i}" for i in range(n)]
    if isinstance(labels, str) or len(labels) != n:
        raise ValueError(f"labels must be a sequence of {n} strings, one per cloud; got {labels!r}.")
    if lengths is None:
        lengths = [None] * n
    if len(lengths) != n:
        raise ValueError(f"lengths must have one entry per cloud ({n}); got {len(lengths)}.")
    colors = list(colors) if colors is not None else [PALETTE[i % len(PALETTE)] for i in range(n)]
    if len(colors) != n:
        raise ValueError(f"colors must have one entry per cloud ({n}); got {len(colors)}.")
    fig = go.Figure()
    for i, (cloud, label, length, color) in enumerate(zip(clouds, labels, lengths, colors)):
        arr = _as_numpy_cloud(f"clouds[{i}]", cloud, length)
        fig.add_trace(
            go.Scatter3d(
                x=arr[:, 0].round(5), y=arr[:, 1].round(5), z=arr[:, 2].round(5), mode="markers",
                name=str(label), marker=dict(size=size, color=color, opacity=0.85, line=dict(width=0)),
            )
        )
    fig.update_layout(
        title=title,
        template="plotly_white",
        scene=dict(aspectmode="data", xaxis_title="x", yaxis_title="y", zaxis_title="z"),
        margin=dict(l=0, r=0, t=40 if title else 10, b=0),
        height=480,
        legend=dict(itemsizing="constant"),
    )
    return fig


def show_plotly(fig: Any) -> None:
    """Display a plotly figure so that it also works in the offline HTML book.

    In Jupyter this behaves like plotly's ``"notebook"`` renderer: the first call in a kernel
    embeds plotly.js itself in the notebook output (no CDN; with ``DIFFCP_PLOTLYJS=site``, set
    when chapters are executed for the book, the built site serves plotly.js once instead), and every figure is a ``text/html``
    output, which Jupyter Book renders without "unknown mime type" warnings. Unlike the stock
    renderer it adds no MathJax CDN script and gives the figure a deterministic ``div`` id
    (``diffcp-plot-1``, ``diffcp-plot-2``, ...), so re-executed notebooks do not change. On
    Google Colab, where every output lives in its own frame, it uses the ``"colab"`` renderer.
    Outside IPython it falls back to ``fig.show()``.

    Args:
        fig: a ``plotly.graph_objects.Figure`` (e.g. from :func:`plot_clouds`).
    """
    global _PLOTLYJS_SHOWN, _FIGURE_COUNT
    pio = _require("plotly.io", "show_plotly")
    go = _require("plotly.graph_objects", "show_plotly")
    if not isinstance(fig, go.Figure):
        raise TypeError(f"fig must be a plotly.graph_objects.Figure; got {type(fig).__name__}.")
    if "google.colab" in sys.modules:
        fig.show(renderer="colab")
        return
    ip = sys.modules.get("IPython")
    if ip is None or ip.get_ipython() is None:
        fig.show()
        return
    from IPython.display import HTML, display
    from plotly.offline import get_plotlyjs

    if not _PLOTLYJS_SHOWN:
        # For the book (DIFFCP_PLOTLYJS=site, set when chapters are executed for it), the site serves
        # plotly.js once (book/_ext/book_fixes.py); elsewhere the notebook embeds it (works offline).
        site = os.environ.get("DIFFCP_PLOTLYJS") == "site"
        script = "" if site else f"\n<script type=\"text/javascript\">{get_plotlyjs()}</script>"
        display(HTML("<script type=\"text/javascript\">window.PlotlyConfig = {MathJaxConfig: 'local'};</script>"
                     + script))
        _PLOTLYJS_SHOWN = True
    _FIGURE_COUNT += 1
    html = pio.to_html(fig, include_plotlyjs=False, include_mathjax=False, full_html=False,
                       div_id=f"diffcp-plot-{_FIGURE_COUNT}", default_width="100%", default_height=480,
                       config={"displaylogo": False, "responsive": True}, validate=False)
    display(HTML(html))


def matplotlib_clouds(ax, *clouds, labels: Optional[Sequence[str]] = None, lengths: Optional[Sequence[Optional[int]]] = None,
                      size: float = 2.0, colors: Optional[Sequence[str]] = None, title: Optional[str] = None):
    """Draw point clouds on a matplotlib 3-D axes (``projection="3d"``) with equal aspect.

    The static twin of :func:`plot_clouds` for figures that must also print.

    Args:
        ax: a ``mpl_toolkits.mplot3d.Axes3D``, e.g. ``fig.add_subplot(projection="3d")``.
        *clouds: ``(N, 3)`` clouds (tensors or arrays).
        labels, lengths, size, colors, title: as in :func:`plot_clouds`.

    Returns:
        ``ax``, for chaining.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt, torch
        >>> ax = plt.figure().add_subplot(projection="3d")
        >>> _ = matplotlib_clouds(ax, torch.rand(10, 3), labels=["source"])
        >>> len(ax.collections)
        1
    """
    _require("matplotlib", "matplotlib_clouds")
    import numpy as np

    if getattr(ax, "name", None) != "3d":
        raise ValueError("ax must be a 3-D axes; create it with fig.add_subplot(projection='3d').")
    if not clouds:
        raise ValueError("matplotlib_clouds needs at least one cloud; got none.")
    n = len(clouds)
    labels = list(labels) if labels is not None else [f"cloud {i}" for i in range(n)]
    lengths = list(lengths) if lengths is not None else [None] * n
    colors = list(colors) if colors is not None else [PALETTE[i % len(PALETTE)] for i in range(n)]
    if not (len(labels) == len(lengths) == len(colors) == n):
        raise ValueError(f"labels, lengths and colors must each have one entry per cloud ({n}).")
    arrays = [_as_numpy_cloud(f"clouds[{i}]", c, l) for i, (c, l) in enumerate(zip(clouds, lengths))]
    for arr, label, color in zip(arrays, labels, colors):
        ax.scatter(arr[:, 0], arr[:, 1], arr[:, 2], s=size, c=color, label=str(label), depthshade=False)
    allpts = np.concatenate(arrays, axis=0)
    if len(allpts):
        lo, hi = allpts.min(0), allpts.max(0)
        ax.set_xlim(lo[0], hi[0]), ax.set_ylim(lo[1], hi[1]), ax.set_zlim(lo[2], hi[2])
        ax.set_box_aspect(np.maximum(hi - lo, 1e-9))
    ax.set_xlabel("x"), ax.set_ylabel("y"), ax.set_zlabel("z")
    if title:
        ax.set_title(title)
    if n > 1 or labels[0]:
        ax.legend(loc="upper left")
    return ax
