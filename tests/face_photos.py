"""insightface's shipped photos as test inputs (used by test_faces.py and test_arcface.py)."""

import importlib.util
from pathlib import Path

import cv2
import numpy as np

IMAGES_DIR = Path(importlib.util.find_spec("insightface").origin).parent / "data" / "images"
EYES = slice(0, 2)


def rgb(name: str) -> np.ndarray:
    """A photo shipped in insightface's wheel as RGB uint8."""
    image = cv2.imread(str(IMAGES_DIR / name))
    assert image is not None, IMAGES_DIR / name
    return np.ascontiguousarray(image[..., ::-1])


def tom_hanks_canvas() -> tuple[np.ndarray, int, tuple[int, int]]:
    """Tom_Hanks_54745.png (an aligned 112 crop) upsampled 4x and pasted into a 600x700 canvas."""
    scale, (top, left) = 4, (90, 150)
    face = cv2.resize(rgb("Tom_Hanks_54745.png"), None, fx=scale, fy=scale, interpolation=3)
    canvas = np.full((600, 700, 3), 40, dtype=np.uint8)
    canvas[top : top + face.shape[0], left : left + face.shape[1]] = face
    return canvas, scale, (top, left)


def upsampled_to_original(points: np.ndarray, scale: int) -> np.ndarray:
    """Pixel coords in a cv2.resize(fx=scale) image -> original coords (centres at integers)."""
    return (points + 0.5) / scale - 0.5
