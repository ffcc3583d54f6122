"""Head pose (yaw, pitch, roll in degrees) per image, and its statistics per set and identity.

Two estimators, both reporting the paper's angle convention (6DRepNet's, below):
- SixDRepNetEstimator (the paper's): 6DRepNet (pose_6drepnet.py) on each detected face, aligned
  to 112x112 and padded by 30 px, as the ID-Booth notebook; needs the released weights by path.
- PoseEstimator (offline fallback, not comparable with the paper): dlib landmarks + PnP on a
  generic 3D face. Against an independent 3D face its pitch reads 19-29 % compressed, and
  dlib's frontal detector misses near-profile faces, so its spread reads low.

Paper convention (6DRepNet's draw_axis): yaw > 0 = the face turned towards the image's left (the
subject's right); pitch > 0 = looking up; roll > 0 = tilted clockwise as displayed.

dlib-PnP: pose = the rotation `cv2.solvePnP` finds between a generic 3D face (14 landmarks,
MODEL_POINTS) and the face's dlib landmarks, seen by a pinhole camera with focal length = image
width, principal point at the image centre ((W - 1) / 2, (H - 1) / 2: pixel centres at integer
coordinates, as in faces.py) and no distortion.

solve_head_pose's angle conventions (degrees, in the camera's frame: x to the image's right,
y down, z away from the camera; a face looking straight into the camera is (0, 0, 0)):
- yaw > 0: the face is turned towards the image's right (the subject's own left; the opposite
  of the paper's, so PoseEstimator negates it);
- pitch > 0: the face looks up (towards the top of the image);
- roll > 0: the face is tilted clockwise in the image as displayed (the image-right eye lower).
The rotation is R = Rz(roll) @ Ry(-yaw) @ Rx(-pitch), with Rx, Ry, Rz the right-handed rotations
about the camera axes. Yaw is the middle angle so that the only gimbal lock is at
yaw = +-90 deg (a full profile), which dlib's frontal detector never finds.
Angles are relative to the camera axes, not to the line of sight: a face far off the image
centre that looks parallel to the optical axis reads (0, 0, 0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from image_sets import aligned_face, rows_of_face_model

ANGLE_NAMES = ("yaw", "pitch", "roll")
CAMERA_TO_PAPER_SIGNS = np.array([-1.0, 1.0, 1.0])  # solve_head_pose's yaw is the paper's -yaw

# dlib 68-point indices of MODEL_POINTS' rows: brow ends (17, 21, 22, 26), eye corners
# (36, 39, 42, 45), nostril wings (31, 35), mouth corners (48, 54), lower lip centre 57, chin 8.
MODEL_LANDMARKS = (17, 21, 22, 26, 36, 39, 42, 45, 31, 35, 48, 54, 57, 8)

# The 14-point generic face of lincolnhard/head-pose-estimation (video_test_shape.cpp), taken from
# the anthropometric 3D face model of the University of Coimbra's ISR
# (http://aifi.isr.uc.pt/Downloads/OpenGL/glAnthropometric3DModel.cpp), rows ordered like
# MODEL_LANDMARKS. That table puts dlib's image-left points at +x with y up and z towards the
# viewer, i.e. a mirror image in a right-handed frame, which PnP can fit only depth-reversed.
# Negating all three axes gives the true face in the camera's frame (x image-right, y down, z away
# from the camera), so a frontal face is R = I and nothing needs a 180-degree fix-up.
MODEL_POINTS = -np.array(
    [
        [6.825897, 6.760612, 4.402142],
        [1.330353, 7.122144, 6.903745],
        [-1.330353, 7.122144, 6.903745],
        [-6.825897, 6.760612, 4.402142],
        [5.311432, 5.485328, 3.987654],
        [1.789930, 5.393625, 4.413414],
        [-1.789930, 5.393625, 4.413414],
        [-5.311432, 5.485328, 3.987654],
        [2.005628, 1.409845, 6.165652],
        [-2.005628, 1.409845, 6.165652],
        [2.774015, -2.080775, 5.048531],
        [-2.774015, -2.080775, 5.048531],
        [0.000000, -3.116408, 6.097667],
        [0.000000, -7.415691, 4.070434],
    ],
    dtype=np.float64,
)  # (14, 3), model units


def camera_matrix(width: int, height: int) -> np.ndarray:
    """(3, 3) pinhole intrinsics: f = width, principal point ((width - 1) / 2, (height - 1) / 2)."""
    return np.array(
        [[width, 0.0, (width - 1) / 2.0], [0.0, width, (height - 1) / 2.0], [0.0, 0.0, 1.0]],
        dtype=np.float64,
    )


def _rotation_x(radians: float) -> np.ndarray:
    """(3, 3) right-handed rotation about the camera's x axis."""
    cos, sin = math.cos(radians), math.sin(radians)
    return np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])


def _rotation_y(radians: float) -> np.ndarray:
    """(3, 3) right-handed rotation about the camera's y axis."""
    cos, sin = math.cos(radians), math.sin(radians)
    return np.array([[cos, 0.0, sin], [0.0, 1.0, 0.0], [-sin, 0.0, cos]])


def _rotation_z(radians: float) -> np.ndarray:
    """(3, 3) right-handed rotation about the camera's z axis."""
    cos, sin = math.cos(radians), math.sin(radians)
    return np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])


def rotation_from_angles(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """(3, 3) model-to-camera rotation R = Rz(roll) @ Ry(-yaw) @ Rx(-pitch) (degrees in)."""
    return (
        _rotation_z(math.radians(roll))
        @ _rotation_y(-math.radians(yaw))
        @ _rotation_x(-math.radians(pitch))
    )


def angles_from_rotation(rotation: np.ndarray) -> np.ndarray:
    """(3, 3) rotation -> (3,) yaw, pitch, roll in degrees, the inverse of rotation_from_angles.

    atan2 throughout (no arcsin domain errors from round-off); exact for |yaw| < 90 deg.
    """
    r = np.asarray(rotation, dtype=np.float64)
    yaw = -math.atan2(-r[2, 0], math.hypot(r[2, 1], r[2, 2]))
    pitch = -math.atan2(r[2, 1], r[2, 2])
    roll = math.atan2(r[1, 0], r[0, 0])
    return np.degrees([yaw, pitch, roll])


def _frontal_guess(image_points: np.ndarray, camera: np.ndarray) -> np.ndarray:
    """(3,) translation placing the frontal model over the points (matching centroid and spread)."""
    focal, centre = camera[0, 0], camera[:2, 2]
    model_xy = MODEL_POINTS[:, :2]
    model_spread = np.sqrt(((model_xy - model_xy.mean(0)) ** 2).sum(1).mean())
    image_spread = np.sqrt(((image_points - image_points.mean(0)) ** 2).sum(1).mean())
    depth = focal * model_spread / max(float(image_spread), 1e-6)
    offset = (image_points.mean(0) - centre) * depth / focal - model_xy.mean(0)
    return np.array([offset[0], offset[1], depth - MODEL_POINTS[:, 2].mean()])


def solve_head_pose(image_points: np.ndarray, width: int, height: int) -> np.ndarray | None:
    """(14, 2) pixel points ordered like MODEL_POINTS -> (3,) yaw, pitch, roll degrees, or None.

    Iterative (Levenberg-Marquardt) PnP started from the frontal pose at the distance the points'
    spread implies, which keeps it on the face-in-front-of-the-camera solution.
    """
    image_points = np.asarray(image_points, dtype=np.float64).reshape(len(MODEL_POINTS), 2)
    camera = camera_matrix(width, height)
    rotation_vector = np.zeros((3, 1))
    translation = _frontal_guess(image_points, camera).reshape(3, 1)
    solved, rotation_vector, translation = cv2.solvePnP(
        MODEL_POINTS,
        image_points,
        camera,
        None,
        rotation_vector,
        translation,
        useExtrinsicGuess=True,
        flags=cv2.SOLVEPNP_ITERATIVE,
    )
    if not solved or not np.all(np.isfinite(rotation_vector)) or translation[2, 0] <= 0:
        return None
    return angles_from_rotation(cv2.Rodrigues(rotation_vector)[0])


class PoseEstimator:
    """dlib HOG detector (largest face) + 68-point landmarks -> PnP head pose per image.

    Uses faces.py's dlib detector, shape predictor and upsampling rule (upsampled only when no
    face is found, up to `max_upsample` 2x steps and `max_pixels` pixels), as training does.
    """

    name = "dlib-hog68-pnp14"
    comparable_with_paper = False

    def __init__(self, max_upsample: int = 2, max_pixels: int = 8_000_000):
        from faces import DlibFaceDetector

        self.faces = DlibFaceDetector(max_upsample=max_upsample, max_pixels=max_pixels)

    def landmarks(self, image: np.ndarray) -> np.ndarray | None:
        """(H, W, 3) uint8 RGB -> (68, 2) float64 dlib landmarks of the largest face, or None."""
        from faces import dlib_detect_faces

        image = np.ascontiguousarray(image, dtype=np.uint8)
        faces = dlib_detect_faces(
            self.faces.detector, image, self.faces.max_upsample, self.faces.max_pixels
        )
        if not faces:
            return None
        largest = max(faces, key=lambda rect: rect.width() * rect.height())
        shape = self.faces.predictor(image, largest)
        return np.array([[part.x, part.y] for part in shape.parts()], dtype=np.float64)

    def estimate_image(self, image: np.ndarray) -> np.ndarray | None:
        """(H, W, 3) uint8 RGB -> (3,) yaw, pitch, roll degrees of the largest face (paper's
        convention), or None."""
        points = self.landmarks(image)
        if points is None:
            return None
        height, width = image.shape[:2]
        angles = solve_head_pose(points[list(MODEL_LANDMARKS)], width, height)
        return None if angles is None else angles * CAMERA_TO_PAPER_SIGNS

    def estimate(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """N RGB uint8 images -> (N, 3) float32 yaw, pitch, roll (zero where no face), (N,) found.

        `found` is False where no face is detected (or, rarely, PnP finds no pose in front of
        the camera).
        """
        angles = np.zeros((len(images), 3), dtype=np.float32)
        found = np.zeros(len(images), dtype=bool)
        for index, image in enumerate(images):
            face_angles = self.estimate_image(image)
            if face_angles is not None:
                angles[index], found[index] = face_angles, True
        return angles, found


class SixDRepNetEstimator:
    """The paper's pose: 6DRepNet on each face, aligned to 112x112 and padded by 30 px.

    With `detector=None` every image must already be an aligned 112x112 crop (what the
    paper's notebook read); otherwise the detector's largest face is aligned with
    faces.align_face, as training and the identity metrics do. Angles in the paper's order
    of ANGLE_NAMES (yaw, pitch, roll) and its signs.
    """

    comparable_with_paper = True

    def __init__(self, model, detector=None, weights: str = "unnamed", batch_size: int = 16):
        from pose_6drepnet import CROP_PADDING

        self.model = model.eval()
        self.detector = detector
        self.batch_size = batch_size
        aligned = detector.name if detector is not None else "aligned"
        weights = re.sub(r"^6drepnet[-_]?", "", weights, flags=re.IGNORECASE) or weights
        self.name = f"6drepnet-{weights}-{aligned}-pad{CROP_PADDING}"

    def estimate(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """N RGB uint8 images -> (N, 3) float32 yaw, pitch, roll (0 where no face), (N,) found."""
        from pose_6drepnet import pad_crop, predict_angles

        crops = [
            aligned_face(np.asarray(image), self.detector, i, "6DRepNet")
            for i, image in enumerate(images)
        ]
        found = np.array([crop is not None for crop in crops], dtype=bool)
        angles = np.zeros((len(crops), 3), dtype=np.float32)
        if found.any():
            padded = [pad_crop(crop) for crop in crops if crop is not None]
            pitch, yaw, roll = predict_angles(self.model, padded, self.batch_size).T
            angles[found] = np.stack([yaw, pitch, roll], axis=1)  # ANGLE_NAMES order
        return angles, found


def build_pose_estimator(
    weights: str | Path | None,
    face_detector: str | None = "auto",
    face_models_root: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 16,
) -> PoseEstimator | SixDRepNetEstimator:
    """6DRepNet (the paper's) from weights by path, else the dlib-PnP fallback."""
    if weights is None:
        return PoseEstimator()
    from arcface import weights_name
    from faces import DEFAULT_FACE_MODELS_ROOT, build_face_detector
    from pose_6drepnet import load_sixdrepnet

    detector = None
    if face_detector is not None:
        detector = build_face_detector(face_detector, face_models_root or DEFAULT_FACE_MODELS_ROOT)
    model = load_sixdrepnet(weights, device)
    return SixDRepNetEstimator(model, detector, weights_name(weights), batch_size)


def estimate_pose_files(
    estimator: PoseEstimator | SixDRepNetEstimator, paths: Sequence[Path]
) -> tuple[np.ndarray, np.ndarray]:
    """Files -> (N, 3) yaw, pitch, roll rows and (N,) status (ok / no face / unreadable)."""
    return rows_of_face_model(paths, len(ANGLE_NAMES), estimator.estimate)


def _mean_std(values: list[float]) -> dict[str, float]:
    """Mean and population std of a list (nan for an empty one)."""
    if not values:
        return {"mean": math.nan, "std": math.nan}
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def pose_spread(angles: np.ndarray, identities: Sequence[str]) -> dict:
    """Head-pose statistics of one image set, the paper's table: mean and population std of
    each angle over all faces (`all_faces`), and per identity the population std of yaw,
    pitch, roll, then their mean and population std over identities.

    `angles` (N, 3) holds only faces that were found (status ok), `identities` (N,) their
    identity. Identities with fewer than 2 faces have no spread: they are left out of the
    per-identity statistics and counted, but their faces count in `all_faces` and `n_faces`.
    """
    angles = np.asarray(angles, dtype=np.float64).reshape(-1, 3)
    labels = np.asarray(identities, dtype=object).astype(str).reshape(-1)
    if len(labels) != len(angles):
        raise ValueError(f"{len(angles)} pose rows but {len(labels)} identities")
    per_identity, too_few = {}, []
    for name in np.unique(labels):
        members = angles[labels == name]  # (n, 3)
        if len(members) < 2:
            too_few.append(str(name))
            continue
        spread = members.std(axis=0)
        per_identity[str(name)] = {"n_faces": int(len(members))} | {
            angle: float(value) for angle, value in zip(ANGLE_NAMES, spread, strict=True)
        }
    result: dict = {
        angle: _mean_std([entry[angle] for entry in per_identity.values()]) for angle in ANGLE_NAMES
    }
    result["all_faces"] = {
        angle: _mean_std(angles[:, column].tolist()) for column, angle in enumerate(ANGLE_NAMES)
    }
    result["n_faces"] = int(len(angles))
    result["n_identities"] = len(per_identity)
    result["n_identities_too_few_faces"] = len(too_few)
    result["identities_too_few_faces"] = too_few
    result["per_identity"] = per_identity
    return result
