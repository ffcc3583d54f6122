"""Identity embeddings of image folders: ArcFace (the paper's) or dlib's shipped 128-d model.

- "arcface" (default): the project's pipeline, exactly as training uses it:
  `faces.build_face_detector` -> 5-point alignment to 112x112 -> `arcface.load_arcface`
  (`datasets.annotate_images`). Needs recogniser weights (--arcface_weights).
- "dlib": dlib's ResNet face descriptor (`dlib_face_recognition_resnet_model_v1.dat` from
  face-recognition-models) with dlib's own HOG detector and 5-point shape predictor, as in
  dlib's dnn_face_recognition_ex (the recogniser expects dlib's own face chips, so
  --face_detector does not apply). It needs no download, which makes it the offline choice;
  it is not the paper's embedder.

Images where no face is found get a zero row and STATUS_NO_FACE; callers count and list them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from image_sets import rows_of_face_model

DLIB_RECOGNISER_FILE = "dlib_face_recognition_resnet_model_v1.dat"
DLIB_LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"  # what dlib's recogniser example uses


class FaceEmbedder(Protocol):
    """Detect + align + embed; `name` identifies weights and detector for cache keys."""

    name: str
    embedding_dim: int

    def embed(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 RGB images -> (N, D) float32 embeddings, (N,) bool face found."""
        ...


class ArcFaceEmbedder:
    """ArcFace recogniser behind the project's face detector and 5-point alignment."""

    def __init__(self, detector, encoder, batch_size: int = 32):
        self.detector = detector
        self.encoder = encoder
        self.batch_size = batch_size
        self.name = f"arcface-{encoder.name}-{detector.name}"
        self.embedding_dim = int(getattr(encoder, "embedding_dim", 512))

    def embed(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(N, 512) unit embeddings (zero where no face) and (N,) found mask."""
        from datasets import annotate_images

        return annotate_images(list(images), self.detector, self.encoder, self.batch_size)


class DlibEmbedder:
    """dlib HOG detector (upsampled until a face is found) + 5 landmarks + 128-d ResNet."""

    name = "dlib-resnet128-hog5"
    embedding_dim = 128

    def __init__(self, max_upsample: int = 2, max_pixels: int = 8_000_000):
        import dlib

        from faces import dlib_hog_detector, dlib_model_path  # the training detector's

        self.detector = dlib_hog_detector()
        self.predictor = dlib.shape_predictor(str(dlib_model_path(DLIB_LANDMARKS_FILE)))
        recogniser_path = dlib_model_path(DLIB_RECOGNISER_FILE)
        self.recogniser = dlib.face_recognition_model_v1(str(recogniser_path))
        self.max_upsample = max_upsample
        self.max_pixels = max_pixels

    def _largest_face(self, image: np.ndarray):
        """dlib rectangle of the largest face at the smallest upsampling that finds one."""
        from faces import dlib_detect_faces

        faces = dlib_detect_faces(self.detector, image, self.max_upsample, self.max_pixels)
        return max(faces, key=lambda rect: rect.width() * rect.height()) if faces else None

    def embed(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(N, 128) dlib descriptors (zero where no face) and (N,) found mask."""
        embeddings = np.zeros((len(images), 128), dtype=np.float32)
        found = np.zeros(len(images), dtype=bool)
        for index, image in enumerate(images):
            image = np.ascontiguousarray(image, dtype=np.uint8)
            face = self._largest_face(image)
            if face is None:
                continue
            shape = self.predictor(image, face)
            embeddings[index] = np.asarray(self.recogniser.compute_face_descriptor(image, shape))
            found[index] = True
        return embeddings, found


def _build_arcface(
    arcface_weights: str | Path | None,
    face_detector: str,
    face_models_root: str | Path | None,
    device: str,
) -> FaceEmbedder:
    """ArcFaceEmbedder from weights + detector name (see arcface.build_face_detector)."""
    if arcface_weights is None:
        raise ValueError(
            "--embedder arcface needs --arcface_weights (an arcface_torch backbone.pth or an "
            "insightface recogniser .onnx); or use --embedder dlib (offline, not the paper's)"
        )
    import faces
    from arcface import load_arcface

    models_root = face_models_root or faces.DEFAULT_FACE_MODELS_ROOT
    detector = faces.build_face_detector(face_detector, models_root)
    return ArcFaceEmbedder(detector, load_arcface(arcface_weights, device=device))


def _build_dlib(
    arcface_weights: str | Path | None,
    face_detector: str,
    face_models_root: str | Path | None,
    device: str,
) -> FaceEmbedder:
    """DlibEmbedder (dlib's own detection and alignment; the other arguments do not apply)."""
    return DlibEmbedder()


EMBEDDERS: dict[str, Callable[..., FaceEmbedder]] = {"arcface": _build_arcface, "dlib": _build_dlib}


def build_embedder(
    name: str,
    arcface_weights: str | Path | None = None,
    face_detector: str = "auto",
    face_models_root: str | Path | None = None,
    device: str = "cpu",
) -> FaceEmbedder:
    """Face embedder by name: "arcface" | "dlib"."""
    if name not in EMBEDDERS:
        raise ValueError(f"unknown embedder {name!r}; options: {sorted(EMBEDDERS)}")
    return EMBEDDERS[name](arcface_weights, face_detector, face_models_root, device)


def embed_image_files(
    embedder: FaceEmbedder, paths: Sequence[Path]
) -> tuple[np.ndarray, np.ndarray]:
    """Files -> (N, D) embeddings and (N,) status (ok / no face / unreadable)."""
    return rows_of_face_model(paths, embedder.embedding_dim, embedder.embed)
