"""Where the toolkit keeps files of its own (no dependencies beyond the standard library). Writing
files and folders whole (the `.partial` folder, then one rename) is runtime.files."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The toolkit's cache folder ($IDEFICS_TOOLKIT_CACHE or ~/.cache/idefics-toolkit), for the
    embedded default checkpoint (runtime.reference.sources) and calibration tensors alike."""
    return Path(os.environ.get("IDEFICS_TOOLKIT_CACHE") or Path.home() / ".cache" / "idefics-toolkit")
