"""The base of every configuration section: a typed, validated mapping that refuses unknown keys.

Each package owns the schema of its own section (the camera's in :mod:`edge_runtime.acquisition.config`, the
outputs' in :mod:`edge_runtime.publishing.config`); the service composes them (:mod:`edge_runtime.service.config`)
so that lower layers never import the service to learn what they are configured with.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: a misspelt key is an error naming it, never silently ignored."""

    model_config = ConfigDict(extra="forbid")
