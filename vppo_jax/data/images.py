"""Opening one entry of a row's image list, in any of the forms ViRL39K-style files use."""

from __future__ import annotations

import io
import os
from typing import Any

from PIL import Image

from vppo_jax.io import paths


def open_image_header(entry: Any, base_dir: str) -> Image.Image:
    """A PIL image from raw bytes, an HF datasets {"bytes", "path"} dict, or a file path, with
    only its header read: size and mode are known, the pixels are decoded by `image.load()`
    (or the first operation that needs them). So an image can be judged by its size before
    a 6000 x 6000 one spends 100 MB being decoded.

    Relative paths are relative to `base_dir` (the data file's directory, which may be in a
    bucket: the file is read through vppo_jax/io/paths.py). HF datasets keeps
    the original file name in "path" next to the bytes, so bytes win when both are present.
    Raises ValueError for an entry of another type, and whatever PIL raises for a missing or
    unrecognised file (OSError, DecompressionBombError, SyntaxError, ...).
    """
    if isinstance(entry, dict):
        data, path = entry.get("bytes"), entry.get("path")
        entry = data if data else path
    if isinstance(entry, str) and entry:
        with paths.open_file(os.path.join(base_dir, entry), "rb") as f:
            entry = f.read()
    if isinstance(entry, (bytes, bytearray)):
        return Image.open(io.BytesIO(entry))
    kind = type(entry).__name__
    raise ValueError(f"an image entry must be bytes, a path or a {{'bytes', 'path'}} dict, got {kind}")


def open_image(entry: Any, base_dir: str) -> Image.Image:
    """`open_image_header`, then decoded: a truncated file fails here, not later in a worker thread."""
    image = open_image_header(entry, base_dir)
    image.load()
    return image
