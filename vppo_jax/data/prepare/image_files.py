"""Finding the image file a row names, among the files under --src, loose or inside zip archives.

Datasets that ship images as files name them by a path relative to a layout of their own
(PAPO-Eval rows say `./data/images/<folder>/<file>.png` while the hub repository holds
`<folder>/<file>.png` inside `<split>_images.zip`). So a reference is matched by the
longest tail of its path that names a file under --src: `./data/images/geo/1.png` finds
`geo/1.png` in an archive, or `images/geo/1.png` unpacked anywhere below. A bare file name
(one path component) must be unique to match. Loose files win over archive members, so an
unpacked copy next to its zip is read from disk.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence

from vppo_jax.data.prepare.example import PrepareError

Location = tuple[str, str]  # (zip archive, member) or ("", file path)


class ImageFiles:
    """with ImageFiles(["snapshot/"]) as images: images.read("./data/images/geo/1.png") -> bytes"""

    def __init__(self, directories: Sequence[str]):
        """Indexes the files under `directories` (and in their zip archives) up front: a broken
        archive fails the run here, not as one skipped row after another."""
        self.directories = list(directories)
        self._archives: dict[str, zipfile.ZipFile] = {}
        self._index = self._build_index()

    def __enter__(self) -> ImageFiles:
        return self

    def __exit__(self, *exc_info):
        for archive in self._archives.values():
            archive.close()

    def read(self, reference: str) -> bytes:
        """The bytes of the file `reference` names; FileNotFoundError when no file under the
        directories matches it (or only a bare name shared by several files does), OSError when
        it cannot be read."""
        archive, path = self.locate(reference)
        if archive:
            try:
                return self._archives[archive].read(path)
            except zipfile.BadZipFile as error:  # a corrupt member (bad CRC, truncated archive)
                raise OSError(f"{archive}: {path}: {error}") from None
        with open(path, "rb") as f:
            return f.read()

    def locate(self, reference: str) -> Location:
        if os.path.isabs(reference) and os.path.isfile(reference):
            return "", reference
        parts = path_parts(reference)
        for start in range(len(parts)):
            tail = tuple(parts[start:])
            locations = self._index.get(tail, [])
            if locations and (len(tail) > 1 or len(locations) == 1):
                return locations[0]
        raise FileNotFoundError(f"no file under {self.directories} (loose or in a .zip) matches {reference!r}")

    def _build_index(self) -> dict[tuple[str, ...], list[Location]]:
        """Every tail of every file's path (relative to its directory, or its member name in a
        zip archive) -> the files it names."""
        index: dict[tuple[str, ...], list[Location]] = {}
        archives = []
        for directory in self.directories:
            for parent, _, names in sorted(os.walk(directory)):
                for name in sorted(names):
                    path = os.path.join(parent, name)
                    if name.lower().endswith(".zip"):
                        archives.append(path)
                    else:
                        add_tails(index, path_parts(os.path.relpath(path, directory)), ("", path))
        for path in archives:  # after the loose files: an unpacked copy is preferred
            try:
                self._archives[path] = zipfile.ZipFile(path)
            except zipfile.BadZipFile as error:
                raise PrepareError(f"{path} is not a readable zip archive ({error}); download it again.") from None
            for member in self._archives[path].namelist():
                if not member.endswith("/"):
                    add_tails(index, path_parts(member), (path, member))
        return index


def path_parts(path: str) -> list[str]:
    """The components of a path written with / or \\, without '.' and empty ones."""
    return [part for part in path.replace("\\", "/").split("/") if part not in ("", ".")]


def add_tails(index: dict[tuple[str, ...], list[Location]], parts: list[str], location: Location):
    for start in range(len(parts)):
        locations = index.setdefault(tuple(parts[start:]), [])
        if location not in locations:  # a file under two of the directories (one inside the other) is one file
            locations.append(location)
