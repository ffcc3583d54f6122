"""Image grids of the report: per identity, generated samples beside that identity's real photos.

Thumbnails are small square JPEGs (THUMBNAIL_SIZE px, the centre square of each image) that
the report embeds as base64, so report.html stays one file. Files are taken in natural order
(2.png before 10.png); files that do not decode are passed over (the report's image-set lists
name them).
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from pathlib import Path

from image_sets import ImageSet

THUMBNAIL_SIZE = 96  # px, each side
THUMBNAIL_QUALITY = 85  # JPEG quality

Thumbnails = dict[str, bytes]  # path relative to the set's root -> JPEG bytes


def natural_key(path: Path) -> list:
    """Sort key that orders digit runs by value: 2.png before 10.png."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def thumbnail_jpeg(path: Path) -> bytes | None:
    """JPEG bytes of the image's centre square scaled to THUMBNAIL_SIZE x THUMBNAIL_SIZE (so
    generated and real images show at one size whatever their own), or None if unreadable."""
    from PIL import Image, ImageOps

    from datasets import UnreadableImageError, load_rgb_image

    try:
        image = load_rgb_image(path)
    except UnreadableImageError:
        return None
    image = ImageOps.fit(image, (THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    return buffer.getvalue()


def by_identity(image_set: ImageSet) -> dict[str, list[Path]]:
    """{identity: its files in natural order}."""
    grouped: dict[str, list[Path]] = {}
    for path, identity in zip(image_set.paths, image_set.identities, strict=True):
        grouped.setdefault(identity, []).append(path)
    return {identity: sorted(paths, key=natural_key) for identity, paths in grouped.items()}


def first_thumbnails(image_set: ImageSet, paths: list[Path], count: int) -> Thumbnails:
    """Thumbnails of the first `count` readable files, keyed by path relative to the root."""
    shown: Thumbnails = {}
    for path in paths:
        if len(shown) == count:
            break
        jpeg = thumbnail_jpeg(path)
        if jpeg is not None:
            shown[path.relative_to(image_set.root).as_posix()] = jpeg
    return shown


class ThumbnailPicker:
    """The first readable thumbnails of each (set, identity), each made once."""

    def __init__(self, max_images: int):
        self.max_images = max_images
        self.thumbnails: dict[str, Thumbnails] = {}  # set name -> thumbnails
        self.shown: dict[tuple[str, str], list[str]] = {}  # (set, identity) -> files shown

    def pick(self, image_set: ImageSet, identity: str, files: list[Path]) -> list[str]:
        """Files shown for the identity (relative to the set's root); thumbnails made once."""
        key = (image_set.name, identity)
        if key not in self.shown:
            made = first_thumbnails(image_set, files, self.max_images)
            self.thumbnails.setdefault(image_set.name, {}).update(made)
            self.shown[key] = list(made)
        return self.shown[key]


def method_grid(
    generated: ImageSet,
    real: tuple[ImageSet, dict[str, list[Path]]] | None,
    max_identities: int,
    picker: ThumbnailPicker,
) -> dict:
    """One method's grid: identities sorted by name, the files shown of each (generated, and
    real where the real set has that identity)."""
    generated_files = by_identity(generated)
    rows = {}
    for identity in sorted(generated_files)[:max_identities]:
        row = {"generated": picker.pick(generated, identity, generated_files[identity])}
        if real is not None and identity in real[1]:
            row["real"] = picker.pick(real[0], identity, real[1][identity])
        else:
            row["real"] = []
        rows[identity] = row
    return {"n_identities": len(generated_files), "rows": rows}


def build_grids(
    image_sets: Mapping[str, ImageSet],
    generated: list[str],
    real_name: str,
    max_images: int,
    max_identities: int,
) -> tuple[dict, dict[str, Thumbnails]]:
    """(grids for metrics.json, {set name: {file: JPEG}}) for every generated set."""
    real_set = image_sets.get(real_name)
    real = (real_set, by_identity(real_set)) if real_set is not None else None
    picker = ThumbnailPicker(max_images)
    methods = {
        name: method_grid(image_sets[name], real, max_identities, picker) for name in generated
    }
    grids = {
        "max_images": max_images,
        "max_identities": max_identities,
        "thumbnail_size": THUMBNAIL_SIZE,
        "real_set": real_name if real_set is not None else None,
        "methods": methods,
    }
    return grids, picker.thumbnails
