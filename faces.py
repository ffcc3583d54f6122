"""Faces: detection, 5 ArcFace landmarks, alignment to the ArcFace template (numpy and torch).

Conventions used throughout:
- images are RGB; numpy images are (H, W, 3) uint8, torch images are (B, C, H, W) float;
- landmarks are (5, 2) pixel coordinates (x, y) with pixel centres at integer coordinates (the
  cv2 / dlib / insightface convention), ordered like `ARCFACE_DST`: image-left eye, image-right
  eye, nose, image-left mouth corner, image-right mouth corner;
- an aligned face is ARCFACE_SIZE x ARCFACE_SIZE with the landmarks moved onto ARCFACE_DST.

Detectors: dlib's HOG detector + 68-point model (shipped by face-recognition-models) and
insightface's SCRFD from a local model pack (never downloaded).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

# insightface.utils.face_align.arcface_dst: the 5 landmark positions of a 112x112 ArcFace crop.
ARCFACE_DST = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)
ARCFACE_SIZE = 112

DEFAULT_FACE_MODELS_ROOT = Path("~/.insightface/models").expanduser()
DEFAULT_INSIGHTFACE_PACK = "buffalo_l"
PACK_DOWNLOAD_HINT = (
    "https://github.com/deepinsight/insightface/releases (model packs, e.g. buffalo_l.zip)"
)


# --------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------
def _check_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """(5, 2) finite float64 landmarks or ValueError."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2) or not np.isfinite(landmarks).all():
        raise ValueError(f"landmarks must be 5 finite (x, y) points, got {landmarks.shape}")
    return landmarks


def similarity_transform(src: np.ndarray, dst: np.ndarray = ARCFACE_DST) -> np.ndarray:
    """(2, 3) least-squares similarity src -> dst (Umeyama; in 2-D: [[a, -b, tx], [b, a, ty]]).

    With centred points s, d: a = sum(s . d) / sum|s|^2, b = sum(s x d) / sum|s|^2, which is
    Umeyama's solution restricted to proper rotations (as skimage SimilarityTransform.estimate).
    """
    src, dst = _check_landmarks(src), np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    s, d = src - src_mean, dst - dst_mean
    spread = (s**2).sum()
    if spread < 1e-12:
        raise ValueError("degenerate landmarks: all points coincide")
    a = (s * d).sum() / spread
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / spread
    rotation_scale = np.array([[a, -b], [b, a]])
    translation = dst_mean - rotation_scale @ src_mean
    return np.concatenate([rotation_scale, translation[:, None]], axis=1)


def similarity_transform_torch(src: torch.Tensor, dst: torch.Tensor | None = None) -> torch.Tensor:
    """Batched closed-form similarity (B, 5, 2) -> dst (5, 2) or (B, 5, 2): (B, 2, 3); no sync.

    Same formula as `similarity_transform`; dst defaults to ARCFACE_DST (on src's device).
    """
    dst = arcface_template_on(src.device) if dst is None else dst
    dst = dst.to(src).expand_as(src)
    src_mean, dst_mean = src.mean(1), dst.mean(1)  # (B, 2)
    s, d = src - src_mean[:, None], dst - dst_mean[:, None]  # (B, 5, 2)
    spread = (s**2).sum((1, 2)).clamp_min(1e-12)  # clamp instead of a data-dependent branch
    a = (s * d).sum((1, 2)) / spread
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(1) / spread
    tx = dst_mean[:, 0] - (a * src_mean[:, 0] - b * src_mean[:, 1])
    ty = dst_mean[:, 1] - (b * src_mean[:, 0] + a * src_mean[:, 1])
    return torch.stack([torch.stack([a, -b, tx], 1), torch.stack([b, a, ty], 1)], 1)


def arcface_template(size: int = ARCFACE_SIZE) -> np.ndarray:
    """ARCFACE_DST scaled to a size x size crop (pixel centres at integer coordinates)."""
    return ARCFACE_DST * (size / ARCFACE_SIZE)


def arcface_template_on(device: torch.device, size: int = ARCFACE_SIZE) -> torch.Tensor:
    """(5, 2) float32 `arcface_template(size)` on `device`, copied there once per process (a
    constant of the training step: each later call returns the same device tensor)."""
    return _template_on(torch.device(device), size)


@functools.cache
def _template_on(device: torch.device, size: int) -> torch.Tensor:
    return torch.as_tensor(arcface_template(size), device=device)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = ARCFACE_SIZE) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 crop warped so landmarks land on the template.

    Same as insightface face_align.norm_crop for size 112 (cv2.warpAffine, bilinear, black border).
    """
    _check_rgb_uint8(image)
    matrix = similarity_transform(landmarks, arcface_template(size))
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


def _invert_affine(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of (B, 2, 3) affine maps, closed form (no linalg error checks, so no sync)."""
    a, b, tx = matrix[:, 0, 0], matrix[:, 0, 1], matrix[:, 0, 2]
    c, d, ty = matrix[:, 1, 0], matrix[:, 1, 1], matrix[:, 1, 2]
    det = a * d - b * c
    inv = torch.stack([torch.stack([d, -b], 1), torch.stack([-c, a], 1)], 1) / det[:, None, None]
    shift = -(inv @ torch.stack([tx, ty], 1)[..., None])  # (B, 2, 1)
    return torch.cat([inv, shift], 2)


def align_faces_torch(
    images: torch.Tensor, landmarks: torch.Tensor, size: int = ARCFACE_SIZE, fill: float = 0.0
) -> torch.Tensor:
    """Differentiable align_face: (B, C, H, W) float, (B, 5, 2) px -> (B, C, size, size).

    Bilinear grid_sample (align_corners=False) with pixel centres at integer coordinates, as
    cv2.warpAffine. Outside the image the crop takes `fill` (0 = black for [0, 255] input but
    mid-grey for [-1, 1] input; pass -1.0 there to match align_face's black border).
    """
    if images.ndim != 4 or landmarks.ndim != 3 or tuple(landmarks.shape[1:]) != (5, 2):
        raise ValueError(
            f"expected images (B, C, H, W) and landmarks (B, 5, 2), got {tuple(images.shape)} "
            f"and {tuple(landmarks.shape)}"
        )
    if landmarks.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {landmarks.shape[0]} landmark sets")
    batch, channels, height, width = images.shape
    work_dtype = torch.promote_types(landmarks.dtype, torch.float32)
    template = arcface_template_on(landmarks.device, size)
    to_crop = similarity_transform_torch(landmarks.to(work_dtype), template)  # src px -> crop px
    to_image = _invert_affine(to_crop)  # crop px -> src px
    # theta maps normalised crop coords u to normalised source coords:
    # crop px = (size * u + size - 1) / 2,   source u = (2 * px + 1) / W - 1   (align_corners=False)
    half = (size - 1) / 2.0
    linear = to_image[:, :, :2] * (size / 2.0)
    shift = to_image[:, :, :2].sum(2) * half + to_image[:, :, 2]  # (B, 2)
    # Per source axis (x: width, y: height), as Python numbers: no host-to-device copy.
    theta = torch.stack(
        [
            torch.cat(
                [linear[:, axis] * 2.0 / extent, (2.0 * shift[:, axis, None] + 1.0) / extent - 1.0],
                1,
            )
            for axis, extent in enumerate((width, height))
        ],
        1,
    )
    grid = F.affine_grid(theta.to(images.dtype), [batch, channels, size, size], align_corners=False)
    sampled = F.grid_sample(
        images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return sampled + fill


# --------------------------------------------------------------------------------------------
# Face detection + 5 landmarks
# --------------------------------------------------------------------------------------------
def _check_rgb_uint8(image: np.ndarray) -> None:
    """ValueError unless image is (H, W, 3) uint8."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 numpy image, got {getattr(image, 'dtype', image)}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {image.shape}")


@runtime_checkable
class FaceDetector(Protocol):
    """Finds the largest face of an RGB uint8 image and returns its 5 ArcFace landmarks."""

    name: str

    def detect_landmarks(self, image: np.ndarray) -> np.ndarray | None:
        """(H, W, 3) uint8 RGB -> (5, 2) float32 landmarks of the largest face, or None."""
        ...


def face_recognition_models_dir() -> Path:
    """Folder holding dlib's .dat models shipped by the face-recognition-models package."""
    # Its own `import` fails (needs pkg_resources), so locate the package without importing it.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "dlib's face models are missing: `pip install face-recognition-models` (ships "
            "shape_predictor_68_face_landmarks.dat), or use --face_detector insightface"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def landmarks_68_to_5(points: np.ndarray) -> np.ndarray:
    """dlib 68 points (68, 2) -> (5, 2): eye centres mean(36..41), mean(42..47), nose 30, 48, 54."""
    return np.stack(
        [
            points[36:42].mean(0),
            points[42:48].mean(0),
            points[30],
            points[48],
            points[54],
        ]
    ).astype(np.float32)


def dlib_model_path(file_name: str) -> Path:
    """A .dat model shipped by face-recognition-models; FileNotFoundError with the fix if absent."""
    path = face_recognition_models_dir() / file_name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall face-recognition-models "
            "(`pip install --force-reinstall face-recognition-models`)"
        )
    return path


@functools.cache
def dlib_hog_detector() -> object:
    """dlib's HOG frontal face detector, built once per process."""
    import dlib

    return dlib.get_frontal_face_detector()


@functools.cache
def _dlib_shape_predictor() -> object:
    """dlib's 68-point shape predictor, loaded once per process (~1 s)."""
    import dlib

    return dlib.shape_predictor(str(dlib_model_path("shape_predictor_68_face_landmarks.dat")))


def dlib_detect_faces(detector, image: np.ndarray, max_upsample: int, max_pixels: int) -> list:
    """dlib rectangles (original pixel coords) at the smallest upsampling that finds a face: up
    to max_upsample 2x pyramid steps while the upsampled image has <= max_pixels pixels."""
    pixels = image.shape[0] * image.shape[1]
    for upsample in range(max_upsample + 1):
        if upsample > 0 and pixels * 4**upsample > max_pixels:
            break
        faces = list(detector(image, upsample))
        if faces:
            return faces
    return []


class DlibFaceDetector:
    """dlib HOG detector + 68-point shape predictor (face-recognition-models) mapped to 5 points.

    The image is upsampled (dlib pyramid, 2x per step) only when no face is found at the current
    scale, up to `max_upsample` steps and `max_pixels` upsampled pixels.
    """

    name = "dlib-hog68"

    def __init__(self, max_upsample: int = 2, max_pixels: int = 8_000_000):
        self.detector, self.predictor = dlib_hog_detector(), _dlib_shape_predictor()
        self.max_upsample = max_upsample
        self.max_pixels = max_pixels

    def _landmarks(self, image: np.ndarray, rect) -> np.ndarray:
        """(5, 2) float32 ArcFace landmarks of the face in dlib rectangle `rect`."""
        shape = self.predictor(image, rect)
        points = np.array([[part.x, part.y] for part in shape.parts()], dtype=np.float32)
        return landmarks_68_to_5(points)

    def detect_all_landmarks(self, image: np.ndarray) -> list[np.ndarray]:
        """(H, W, 3) uint8 RGB -> (5, 2) float32 landmarks of every face, largest first."""
        _check_rgb_uint8(image)
        image = np.ascontiguousarray(image)
        faces = dlib_detect_faces(self.detector, image, self.max_upsample, self.max_pixels)
        faces = sorted(faces, key=lambda rect: -rect.width() * rect.height())
        return [self._landmarks(image, rect) for rect in faces]

    def detect_landmarks(self, image: np.ndarray) -> np.ndarray | None:
        """(H, W, 3) uint8 RGB -> (5, 2) float32 landmarks of the largest face, or None."""
        faces = self.detect_all_landmarks(image)
        return faces[0] if faces else None


def find_detector_file(pack_dir: str | Path) -> Path | None:
    """The SCRFD detector ONNX of an insightface pack folder (det_*.onnx or *scrfd*.onnx)."""
    pack_dir = Path(pack_dir)
    if not pack_dir.is_dir():
        return None
    candidates = sorted(
        path
        for path in pack_dir.glob("*.onnx")
        if path.name.startswith("det_") or "scrfd" in path.name.lower()
    )
    return candidates[0] if candidates else None


def find_detector_pack(models_root: str | Path | None) -> str | None:
    """Name of a pack under models_root that has a detector (buffalo_l preferred), or None."""
    root = Path(models_root or DEFAULT_FACE_MODELS_ROOT).expanduser()
    if find_detector_file(root / DEFAULT_INSIGHTFACE_PACK) is not None:
        return DEFAULT_INSIGHTFACE_PACK
    if not root.is_dir():
        return None
    packs = sorted(path.name for path in root.iterdir() if find_detector_file(path) is not None)
    return packs[0] if packs else None


class InsightFaceDetector:
    """SCRFD from a local insightface model pack (<models_root>/<pack>/det_*.onnx); no downloads."""

    def __init__(
        self,
        models_root: str | Path | None = DEFAULT_FACE_MODELS_ROOT,
        pack: str = DEFAULT_INSIGHTFACE_PACK,
        det_size: tuple[int, int] = (640, 640),
    ):
        pack_dir = Path(models_root or DEFAULT_FACE_MODELS_ROOT).expanduser() / pack
        detector_path = find_detector_file(pack_dir)
        if detector_path is None:
            raise FileNotFoundError(
                f"no insightface face detector in {pack_dir}: put the SCRFD model det_10g.onnx "
                f"of the '{pack}' pack at {pack_dir / 'det_10g.onnx'} (unzip {pack}.zip from "
                f"{PACK_DOWNLOAD_HINT} into {pack_dir.parent}), pass --face_models_root, or use "
                "--face_detector dlib. Nothing is downloaded at run time."
            )
        import onnxruntime
        from insightface.model_zoo import get_model

        try:
            self.model = get_model(str(detector_path))
        except Exception as err:
            raise ValueError(
                f"could not load the face detector {detector_path} ({type(err).__name__}: {err}); "
                "the file is truncated or corrupt: unzip the model pack again"
            ) from err
        if self.model is None or not hasattr(self.model, "detect"):
            raise ValueError(f"{detector_path} is not an insightface SCRFD face detector")
        use_gpu = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        self.model.prepare(ctx_id=0 if use_gpu else -1, input_size=det_size)
        self.name = f"insightface-{pack}-{detector_path.stem}"

    def detect_landmarks(self, image: np.ndarray) -> np.ndarray | None:
        """(H, W, 3) uint8 RGB -> (5, 2) float32 landmarks of the largest face, or None."""
        _check_rgb_uint8(image)
        bgr = np.ascontiguousarray(image[..., ::-1])  # insightface models take cv2 BGR images
        boxes, keypoints = self.model.detect(bgr, max_num=0)  # (N, 5) x1 y1 x2 y2 score, (N, 5, 2)
        if len(boxes) == 0:
            return None
        if keypoints is None:
            raise ValueError(f"detector {self.name} gives no keypoints; use a *_kps / det_* model")
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return keypoints[int(np.argmax(areas))].astype(np.float32)


def _build_insightface(models_root: str | Path | None, pack: str | None) -> FaceDetector:
    """InsightFaceDetector for the given pack, else the pack found under models_root."""
    chosen = pack or find_detector_pack(models_root) or DEFAULT_INSIGHTFACE_PACK
    return InsightFaceDetector(models_root, chosen)


def _build_dlib(models_root: str | Path | None, pack: str | None) -> FaceDetector:
    """DlibFaceDetector (needs no model root)."""
    return DlibFaceDetector()


def _build_auto(models_root: str | Path | None, pack: str | None) -> FaceDetector:
    """insightface when a pack with a detector is under models_root, else dlib."""
    root = Path(models_root or DEFAULT_FACE_MODELS_ROOT).expanduser()
    chosen = pack if pack and find_detector_file(root / pack) else find_detector_pack(root)
    return InsightFaceDetector(models_root, chosen) if chosen else DlibFaceDetector()


FACE_DETECTORS: dict[str, Callable[[str | Path | None, str | None], FaceDetector]] = {
    "auto": _build_auto,
    "insightface": _build_insightface,
    "dlib": _build_dlib,
}


def build_face_detector(
    name: str, models_root: str | Path | None = DEFAULT_FACE_MODELS_ROOT, pack: str | None = None
) -> FaceDetector:
    """Face detector by name: "auto" | "insightface" | "dlib" (models_root: insightface packs)."""
    if name not in FACE_DETECTORS:
        raise ValueError(f"unknown face detector {name!r}; options: {sorted(FACE_DETECTORS)}")
    return FACE_DETECTORS[name](models_root, pack)


FACE_DETECTOR_NAMES = tuple(FACE_DETECTORS)  # the --face_detector choices of every script
