"""Reports for people: one self-contained HTML page per evaluation or field verification (torch-free)."""

from __future__ import annotations

from .report_html import (
    Curve,
    GalleryItem,
    WorstFrames,
    render_evaluation_report,
    render_verify_report,
    write_html,
)

__all__ = ["Curve", "GalleryItem", "WorstFrames", "render_evaluation_report", "render_verify_report", "write_html"]
