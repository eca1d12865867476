"""The coloured message box the wizard and the review panel show sentences in (HTML only, no widget)."""

from __future__ import annotations

# kind -> (background, text colour); the kind is also the box's CSS class, ``lorakit-<kind>``
COLOURS = {"info": ("#e8f1fb", "#1f5fa8"), "error": ("#fdecea", "#a61b1b"), "ok": ("#e9f7ef", "#1e7b3c"),
           "warn": ("#fff6e0", "#8a5a00")}


def message_box(html_text: str, kind: str = "info") -> str:
    """``html_text`` (already escaped) in a box coloured for ``kind``: info, error, ok or warn."""
    bg, fg = COLOURS[kind]
    return (f'<div class="lorakit-{kind}" style="background:{bg};color:{fg};padding:6px 10px;border-radius:4px;'
            f'margin:4px 0">{html_text}</div>')
