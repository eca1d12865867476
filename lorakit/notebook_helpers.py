"""Display helpers the notebooks share: tables, thumbnail grids, the tag chart, batch-friendly progress bars.

They only turn library results into something to look at (HTML with embedded images, matplotlib figures,
DataFrames); every decision stays in the library. Images are embedded as data URIs, so an executed notebook
exported to HTML shows them offline.

>>> from lorakit import notebook_helpers as nh       # doctest: +SKIP
>>> ws = nh.setup_notebook(data_root)                 # doctest: +SKIP
>>> nh.thumbnails(ws, manifest["items"][:8])          # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import resolve_weights
from .errors import ConfigError
from .workspace import Workspace, open_workspace

if TYPE_CHECKING:
    import pandas
    from matplotlib.figure import Figure

BATCH_ENV = "LORAKIT_BATCH"  # set to "1" by lorakit.reports.run_notebook for papermill runs


def in_batch() -> bool:
    """True inside a batch run (``lorakit notebook run``, ``make demo``): no one is there to click."""
    return os.environ.get(BATCH_ENV) == "1"


def setup_notebook(data_root: str | Path | None = None) -> Workspace:
    """The first call of every notebook: open the workspace, show table cells in full and, in a batch run, use
    plain-text progress bars.

    Widget progress bars come out blank in a static HTML export, so a batch run swaps them for text bars.
    """
    if in_batch():
        use_text_progress_bars()
    import pandas as pd

    pd.set_option("display.max_colwidth", 200)  # hashes, paths and settings in full, not cut at 50 characters
    return open_workspace(data_root)


def use_text_progress_bars(mininterval: float = 2.0) -> None:
    """Make ``tqdm.auto`` (used by the trainer, diffusers and transformers) draw plain-text bars on stdout.

    A kernel always looks like a notebook to ``tqdm.auto``, which then draws an ipywidget; in a papermill run
    nobody renders it and the HTML export shows nothing. Text bars are kept in the notebook's output; the
    ``\\r`` redraws are folded into the last state when the HTML is written.
    """
    import tqdm.auto
    import tqdm.std

    class TextBar(tqdm.std.tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("file", sys.stdout)
            kwargs.setdefault("mininterval", mininterval)
            kwargs["dynamic_ncols"] = False
            kwargs.setdefault("ncols", 100)
            super().__init__(*args, **kwargs)

    def trange(*args, **kwargs):
        return TextBar(range(*args), **kwargs)

    tqdm.auto.tqdm = TextBar
    tqdm.auto.trange = trange


# ---- tables ----------------------------------------------------------------------------------------------------
def key_values(mapping: Mapping[str, Any], name: str = "value") -> pandas.DataFrame:
    """A two-column table (``key``, ``value``) of a dict; nested values are shown as compact text."""
    import json

    import pandas as pd

    def text(value: Any) -> Any:
        if isinstance(value, dict | list | tuple):
            return json.dumps(value, ensure_ascii=False)
        return value

    frame = pd.DataFrame({name: [text(v) for v in mapping.values()]}, index=list(mapping.keys()))
    frame.index.name = "key"
    return frame


def left_out_table(counts: Mapping[str, int], selected: int) -> pandas.DataFrame:
    """Counts of a dataset build: the images selected and the assets left out, by reason."""
    import pandas as pd

    rows = [("selected", selected)] + [(f"left out: {reason}", n) for reason, n in counts.items()]
    return pd.DataFrame(rows, columns=["outcome", "assets"]).set_index("outcome")


# ---- images ----------------------------------------------------------------------------------------------------
def data_uri(image: str | Path | bytes, mime: str = "image/png") -> str:
    """An image file (or its bytes) as a ``data:`` URI, so HTML that shows it needs no file next to it."""
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_bytes(image) -> bytes:
    """PNG bytes of a PIL image."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def figure_png(fig: Figure, dpi: int = 90) -> bytes:
    """PNG bytes of a matplotlib figure (for an ``ipywidgets.Image``)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def gallery_html(cards: Sequence[tuple[str | Path | bytes | None, str]], size: int = 96, columns: int = 6, *,
                 wrap: bool = False) -> str:
    """HTML of image cards (image, caption) in a grid of ``columns``, or with ``wrap`` in a row that wraps onto
    the next line on a narrow page (so no card is cut off at its edge); a ``None`` image is a grey "missing" box."""
    cells = []
    for image, caption in cards:
        if image is None or (not isinstance(image, bytes) and not Path(image).is_file()):
            picture = (f'<div style="width:{size}px;height:{size}px;background:#ccc;display:flex;align-items:center;'
                       f'justify-content:center;font-size:11px">missing</div>')
        else:
            picture = (f'<img src="{data_uri(image)}" width="{size}" height="{size}" '
                       f'style="image-rendering:pixelated;border:1px solid #ddd" alt="{html.escape(caption)}"/>')
        cells.append(f'<div class="lorakit-thumb" style="width:{max(size, 120)}px;font-size:11px;line-height:1.3;'
                     f'word-wrap:break-word">{picture}<div>{html.escape(caption)}</div></div>')
    layout = ("display:flex;flex-wrap:wrap;gap:10px;max-width:100%" if wrap
              else f"display:grid;grid-template-columns:repeat({columns},{max(size, 120)}px);gap:10px")
    return f'<div class="lorakit-thumbs" style="{layout}">' + "".join(cells) + "</div>"


def thumbnails(ws: Workspace, items: Iterable[Mapping], limit: int = 12, size: int = 96, columns: int = 6):
    """Dataset items (``path`` relative to the data root, ``caption``) as a grid of images with their captions."""
    from IPython.display import HTML

    cards = [(ws.store.file_path(item["path"]), item.get("caption") or "(no caption)")
             for _, item in zip(range(limit), items, strict=False)]
    return HTML(gallery_html(cards, size=size, columns=columns))


def image_files(paths: Iterable[str | Path], size: int = 128, columns: int = 6, labels: Sequence[str] | None = None):
    """Image files as a grid (labels default to the file names)."""
    from IPython.display import HTML

    files = [Path(p) for p in paths]
    names = list(labels) if labels is not None else [p.name for p in files]
    return HTML(gallery_html(list(zip(files, names, strict=True)), size=size, columns=columns))


def tag_chart(top_tags: Sequence[tuple[str, int]], title: str = "tag frequency") -> Figure:
    """A horizontal bar chart of ``(tag, count)`` pairs, most frequent on top (e.g. ``dataset_summary()["topTags"]``)."""
    from matplotlib.figure import Figure

    tags = [t for t, _ in top_tags][::-1]
    counts = [n for _, n in top_tags][::-1]
    fig = Figure(figsize=(7, max(1.5, 0.32 * len(tags) + 0.8)), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(tags, counts, color="tab:blue")
    for y, n in enumerate(counts):
        ax.text(n, y, f" {n}", va="center", fontsize=9)
    ax.set_xlabel("images with the tag")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    if not tags:
        ax.text(0.5, 0.5, "no tags", transform=ax.transAxes, ha="center")
    return fig


# ---- checkpoints -----------------------------------------------------------------------------------------------
def checkpoint_weights(ws: Workspace, record: Mapping) -> tuple[Path | None, bool]:
    """Where a checkpoint's weights are on this machine and whether they are there."""
    ref = record.get("weights")
    if not ref:
        return None, False
    try:
        path = resolve_weights(dict(ref), ws.config, what=f"checkpoint {record.get('id')}", must_exist=False)
    except ConfigError:
        return None, False
    return path, path.exists()


def is_tiny_checkpoint(record: Mapping) -> bool:
    """A tiny random-weight checkpoint (the demo's, or one made by ``make_tiny_checkpoint``), by its name."""
    return "random weights" in str(record.get("name") or "").lower()


def ensure_demo_checkpoint(ws: Workspace, checkpoint_id: str, build_tiny: bool = True) -> str:
    """Make sure a checkpoint's weights are on disk; a tiny demo checkpoint is built when they are missing.

    Returns a sentence saying what was found or done. Missing weights of any other checkpoint (or of a tiny
    one with ``build_tiny=False``) are an error that says where they were looked for.
    """
    from .models import get_checkpoint, rebuild_tiny_checkpoint

    record = get_checkpoint(ws, checkpoint_id)
    path, present = checkpoint_weights(ws, record)
    if present:
        return f"checkpoint {checkpoint_id!r}: weights at {path}"
    if not (build_tiny and is_tiny_checkpoint(record)):
        raise ConfigError(f"checkpoint {checkpoint_id!r}: weights not found at {path} (see `lorakit checkpoint`)")
    rebuild_tiny_checkpoint(ws, checkpoint_id)
    path, _ = checkpoint_weights(ws, get_checkpoint(ws, checkpoint_id))
    return f"checkpoint {checkpoint_id!r}: built the tiny random-weight pipeline at {path}"


__all__ = [
    "BATCH_ENV", "checkpoint_weights", "data_uri", "ensure_demo_checkpoint", "figure_png", "gallery_html",
    "image_bytes", "image_files", "in_batch", "is_tiny_checkpoint", "key_values", "left_out_table", "setup_notebook", "tag_chart",
    "thumbnails", "use_text_progress_bars",
]
