"""The one exception the calibration commands raise for bad input: the CLI turns it into ``error: ...``, exit 2."""

from __future__ import annotations


class CalibrationError(Exception):
    """Input refused (frames, folders, bundles, store); the message names the file or key at fault.

    Nothing has been written where it matters when this is raised: new bundles are staged and renamed
    into place, and the store's ``current`` link is only switched after validation.
    """
