"""One source row -> one row of our schema (problem, answer, images with their bytes), or a counted skip.

Each dataset family only says where a row keeps its problem, answer and images (`Fields`);
the checks and the image embedding below are shared, so every dataset skips a bad row for
the same reasons.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from vppo_jax.data.images import open_image
from vppo_jax.data.prompts import IMAGE_PLACEHOLDER
from vppo_jax.errors import InputError

# Why a source row was left out; the report counts each.
SKIP_REASONS = (
    "bad_row",  # not an object of the dataset's shape (a malformed JSON line, a field of the wrong type)
    "missing_problem",  # no question, or an empty one
    "missing_answer",  # no reference answer, or an empty one
    "missing_image",  # no image listed, or a listed image that is not in --src
    "bad_image",  # an image whose bytes PIL cannot decode
    "image_mismatch",  # <image> placeholders neither absent nor one per image (the data pipeline would skip it)
)


class PrepareError(InputError):
    """Input that cannot be converted at all (no data file, missing columns, an unreadable
    archive, no usable row); the message says what is wrong and the fix."""


class Skip(Exception):
    """Raised for a row that cannot be converted; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(detail)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Fields:
    """Where a source row keeps what we need, as found there (not yet checked)."""

    problem: Any
    answer: Any
    images: Any  # a list of image entries: {"bytes", "path"} dicts, bytes, or paths into --src
    notes: tuple[str, ...] = ()  # what the family changed in the row, counted in the report


class ImageReader(Protocol):
    """What build_example needs of image_files.ImageFiles (which imports this module)."""

    def read(self, reference: str) -> bytes: ...


def build_example(fields: Fields, images: ImageReader) -> dict:
    """Our row {"problem", "answer", "images": [{"bytes", "path": None}]}; raises Skip.

    The image bytes are copied as published (no re-encoding), after checking that PIL decodes
    them. path is None: the output is self-contained and names no file.
    """
    problem = text(fields.problem, "missing_problem", "problem")
    answer = text(fields.answer, "missing_answer", "answer")
    entries = fields.images
    if not entries:
        raise Skip("missing_image", "the row lists no image")
    if not isinstance(entries, list):
        raise Skip("bad_row", f"the images must be a list, got {type(entries).__name__}")
    placeholders = problem.count(IMAGE_PLACEHOLDER)
    if placeholders not in (0, len(entries)):
        raise Skip("image_mismatch", f"{placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(entries)} images")
    return {
        "problem": problem,
        "answer": answer,
        "images": [{"bytes": image_bytes(entry, k, images), "path": None} for k, entry in enumerate(entries)],
    }


def text(value: Any, missing_reason: str, name: str) -> str:
    """A problem or answer as a non-empty string. Numbers become strings (some answers are
    published as numbers); surrounding whitespace is dropped."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise Skip(missing_reason, f"the {name} is {'missing' if value is None else 'empty'}")
    if not isinstance(value, str):
        raise Skip("bad_row", f"the {name} must be a string, got {type(value).__name__}")
    return value.strip()


def image_bytes(entry: Any, k: int, images: ImageReader) -> bytes:
    """The bytes of image entry k: embedded ({"bytes"} dict or raw bytes) or read from the
    file an entry names (a path string, or a {"path"} dict without bytes)."""
    if isinstance(entry, dict):
        entry = entry.get("bytes") or entry.get("path")
    if isinstance(entry, str) and entry:
        try:
            entry = images.read(entry)
        except FileNotFoundError as error:
            raise Skip("missing_image", f"image {k}: {error}") from None
        except OSError as error:  # there, but unreadable
            raise Skip("bad_image", f"image {k}: {error}") from None
    if not isinstance(entry, (bytes, bytearray)) or not entry:
        raise Skip("missing_image", f"image {k} has neither bytes nor a path (got {type(entry).__name__})")
    try:
        open_image(bytes(entry), base_dir="")  # the data pipeline's own decoder: what it reads, we accept
    except Exception as error:  # PIL raises many types for bad bytes
        raise Skip("bad_image", f"image {k}: {type(error).__name__}: {error}") from None
    return bytes(entry)
