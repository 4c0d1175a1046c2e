"""Errors the training host's command line reports, importable without torch (``weakrest-train push`` and
``keys`` start without loading it)."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not belong to this model."""
