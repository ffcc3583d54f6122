"""Tiny, real evaluation data for the Evaluation/ tests and notebooks (offline).

Identities are real people: the six faces of insightface's shipped `t1.jpg` (found with
dlib's HOG detector) and the shipped `Tom_Hanks_54745.png`, each as a few mirrored /
re-cropped variants. A tiny random DINOv2 is saved with save_pretrained for feature tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from random_models import build_tiny_dinov2  # noqa: F401  (tests import it from here)

CROP_SIZE = 128


def insightface_images_dir() -> Path:
    """Folder of the photos shipped in insightface's wheel."""
    import importlib.util

    spec = importlib.util.find_spec("insightface")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "images"


def _square(image: Image.Image, cx: float, cy: float, side: float) -> Image.Image:
    """Square crop centred at (cx, cy), resized to CROP_SIZE."""
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    return image.crop(tuple(int(round(v)) for v in box)).resize(
        (CROP_SIZE, CROP_SIZE), Image.BICUBIC
    )


def real_face_crops() -> dict[str, Image.Image]:
    """{identity: base face crop}: six people of t1.jpg (left to right) and Tom Hanks."""
    import dlib

    photo = Image.open(insightface_images_dir() / "t1.jpg").convert("RGB")
    detector = dlib.get_frontal_face_detector()
    rects = list(detector(np.asarray(photo), 0)) or list(detector(np.asarray(photo), 1))
    rects = sorted(rects, key=lambda rect: rect.left())
    if len(rects) != 6:
        raise RuntimeError(f"expected six faces in t1.jpg, dlib found {len(rects)}")
    crops = {}
    for index, rect in enumerate(rects):
        cx, cy = (rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2
        crops[f"person_{index}"] = _square(photo, cx, cy, 2.0 * rect.width())
    tom = Image.open(insightface_images_dir() / "Tom_Hanks_54745.png").convert("RGB")
    crops["tom_hanks"] = tom.resize((CROP_SIZE, CROP_SIZE), Image.BICUBIC)
    return crops


def variants(face: Image.Image, count: int) -> list[Image.Image]:
    """Same-person variants: original, mirror, tighter crop, brighter mirror (first `count`)."""
    side = face.width
    tight = face.crop((side // 10, side // 12, side - side // 12, side - side // 10))
    options = [
        face,
        ImageOps.mirror(face),
        tight.resize(face.size, Image.BICUBIC),
        ImageEnhance.Brightness(ImageOps.mirror(face)).enhance(1.2),
    ]
    return options[:count]


def write_identity_folders(
    root: Path, crops: dict[str, Image.Image], identities: list[str], per_identity: int
) -> Path:
    """ROOT/<identity>/<k>.png with `per_identity` variants of each chosen identity."""
    for name in identities:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for k, image in enumerate(variants(crops[name], per_identity)):
            image.save(folder / f"{k}.png")
    return root


def add_bad_images(folder: Path) -> tuple[str, str]:
    """A faceless image and an unreadable .png in `folder`; returns their file names."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "zz_noise.png")
    (folder / "zz_broken.png").write_bytes(b"this is not a png")
    return "zz_noise.png", "zz_broken.png"
