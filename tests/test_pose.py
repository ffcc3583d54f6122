"""Evaluation/pose.py: PnP + Euler conversion on synthetic projections of known pose, and dlib's
landmarks on real photos shipped with insightface under known image transforms (mirror,
in-plane rotation, a pure camera rotation), plus the per-identity spread statistics."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

import faces as face_tools
import pose
from image_sets import STATUS_NO_FACE, STATUS_OK, STATUS_UNREADABLE, cached_rows


def insightface_image(name: str) -> np.ndarray:
    """A photo shipped in insightface's wheel as RGB uint8."""
    import insightface

    path = Path(insightface.__file__).parent / "data" / "images" / name
    image = cv2.imread(str(path))
    assert image is not None, path
    return np.ascontiguousarray(image[..., ::-1])


def mirror(image: np.ndarray) -> np.ndarray:
    """Horizontal mirror image."""
    return np.ascontiguousarray(image[:, ::-1])


def project_model(angles: tuple[float, float, float], translation, width, height) -> np.ndarray:
    """(14, 2) pixels of MODEL_POINTS posed by scipy's intrinsic ZYX rotation (roll, -yaw,
    -pitch), the docstring's R, projected by cv2.projectPoints through pose's camera."""
    yaw, pitch, roll = angles
    rotation = Rotation.from_euler("ZYX", [roll, -yaw, -pitch], degrees=True).as_matrix()
    points, _ = cv2.projectPoints(
        pose.MODEL_POINTS,
        cv2.Rodrigues(rotation)[0],
        np.asarray(translation, dtype=np.float64),
        pose.camera_matrix(width, height),
        None,
    )
    return points[:, 0]  # (14, 2)


@pytest.fixture(scope="module")
def estimator() -> pose.PoseEstimator:
    return pose.PoseEstimator()


@pytest.fixture(scope="module")
def group_faces() -> list[np.ndarray]:
    """Square crops (2.4x dlib's box) of the six people of t1.jpg, left to right."""
    group = insightface_image("t1.jpg")
    rects = sorted(face_tools.dlib_hog_detector()(group, 0), key=lambda rect: rect.left())
    assert len(rects) == 6
    crops = []
    for rect in rects:
        centre_x, centre_y = (rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2
        side = round(2.4 * rect.width())
        left, top = max(round(centre_x - side / 2), 0), max(round(centre_y - side / 2), 0)
        crops.append(np.ascontiguousarray(group[top : top + side, left : left + side]))
    return crops


@pytest.fixture(scope="module")
def tom_hanks() -> np.ndarray:
    """Tom_Hanks_54745.png (an aligned 112 crop) upsampled 4x so dlib's HOG finds it."""
    face = insightface_image("Tom_Hanks_54745.png")
    return cv2.resize(face, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)


# ------------------------------------------------------------------ rotation and PnP maths


def test_rotation_matches_scipy_and_round_trips():
    rng = np.random.default_rng(0)
    for yaw, pitch, roll in rng.uniform([-85, -60, -60], [85, 60, 60], size=(200, 3)):
        expected = Rotation.from_euler("ZYX", [roll, -yaw, -pitch], degrees=True).as_matrix()
        rotation = pose.rotation_from_angles(yaw, pitch, roll)
        np.testing.assert_allclose(rotation, expected, atol=1e-12)
        np.testing.assert_allclose(pose.angles_from_rotation(rotation), [yaw, pitch, roll])
    np.testing.assert_allclose(pose.angles_from_rotation(np.eye(3)), [0, 0, 0], atol=1e-12)


def test_angle_signs_follow_the_docstring():
    """yaw > 0: nose right of the eyes; pitch > 0: nose higher; roll > 0: image-right eye lower."""
    width = height = 512

    def projected(angles):
        points = project_model(angles, [0.0, 0.0, 50.0], width, height)
        nose = points[8:10].mean(0)  # nostril wings 31, 35
        left_eye, right_eye = points[4], points[7]  # outer corners 36 (image left), 45
        return nose - (left_eye + right_eye) / 2, right_eye[1] - left_eye[1]

    frontal_nose, frontal_tilt = projected((0, 0, 0))
    assert abs(frontal_nose[0]) < 1e-9 and abs(frontal_tilt) < 1e-9
    assert projected((20, 0, 0))[0][0] > 5
    assert projected((-20, 0, 0))[0][0] < -5
    assert projected((0, 15, 0))[0][1] < frontal_nose[1] - 5
    assert projected((0, -15, 0))[0][1] > frontal_nose[1] + 5
    assert projected((0, 0, 10))[1] > 5


@pytest.mark.parametrize(
    "angles",
    [(30.0, -10.0, 5.0), (0.0, 0.0, 0.0), (-45.0, 20.0, -15.0), (60.0, -25.0, 30.0)],
)
@pytest.mark.parametrize("translation", [(0.0, 0.0, 60.0), (8.0, -5.0, 45.0)])
def test_solve_recovers_a_projected_pose(angles, translation):
    width, height = 640, 480
    points = project_model(angles, translation, width, height)
    recovered = pose.solve_head_pose(points, width, height)
    # measured: at most 2.4e-6 deg over these and 50 random poses
    np.testing.assert_allclose(recovered, angles, atol=1e-3)


def test_solve_with_pixel_noise_stays_within_a_degree_or_two():
    width, height, angles = 640, 480, (30.0, -10.0, 5.0)
    points = project_model(angles, (3.0, -2.0, 60.0), width, height)  # face ~128 px wide
    rng = np.random.default_rng(1)
    errors = np.array(
        [
            pose.solve_head_pose(points + rng.normal(0, 0.5, points.shape), width, height) - angles
            for _ in range(50)
        ]
    )
    # measured: mean |error| 0.22 deg, max 1.04 deg for 0.5 px noise
    assert np.abs(errors).mean() < 0.6
    assert np.abs(errors).max() < 2.5


# ------------------------------------------------------------------ real faces


def test_mirror_flips_yaw_and_roll_and_keeps_pitch(estimator, group_faces, tom_hanks):
    faces = [*group_faces, tom_hanks]
    poses = np.array([estimator.estimate_image(face) for face in faces])
    mirrored = np.array([estimator.estimate_image(mirror(face)) for face in faces])
    yaw, pitch, roll = poses.T
    yaw_m, pitch_m, roll_m = mirrored.T
    turned = np.abs(yaw) > 10
    # person 4 looks clearly towards the image's left, Tom Hanks slightly towards its right:
    # the paper's (6DRepNet's) signs, yaw > 0 = turned towards the image's left
    assert yaw[4] > 40 and -30 < yaw[6] < -15
    assert turned.sum() >= 5  # measured |yaw|: 35, 20, 52, 15, 21 (and 0.7, 1.8 near frontal)
    assert np.all(np.sign(yaw_m[turned]) == -np.sign(yaw[turned]))
    # measured |yaw + yaw_mirror| / |yaw| <= 0.10 (person 1: -34.7 vs 38.2)
    assert np.all(np.abs(yaw + yaw_m)[turned] < 0.15 * np.abs(yaw[turned]))
    assert np.all(np.abs(yaw[~turned]) < 3) and np.all(np.abs(yaw_m[~turned]) < 3)
    assert np.all(np.abs(pitch - pitch_m) < 4)  # measured <= 2.9
    tilted = np.abs(roll) > 10  # persons 0, 1, 2: -27.6, -26.0, 13.5
    assert tilted.sum() >= 3
    assert np.all(np.sign(roll_m[tilted]) == -np.sign(roll[tilted]))
    assert np.all(np.abs(roll + roll_m) < 4)  # measured <= 2.8


def _canvas(face: np.ndarray, pad: int) -> np.ndarray:
    """The face on a grey border, so that warps keep it whole."""
    return cv2.copyMakeBorder(face, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(110,) * 3)


@pytest.mark.parametrize("degrees", [15.0, -15.0])
def test_in_plane_rotation_changes_roll(estimator, tom_hanks, degrees):
    canvas = _canvas(tom_hanks, 96)
    before = estimator.estimate_image(canvas)
    centre = tuple(float(v) for v in estimator.landmarks(canvas).mean(0))
    # cv2's positive angle turns the picture counter-clockwise on screen: roll goes down
    matrix = cv2.getRotationMatrix2D(centre, degrees, 1.0)
    rotated = cv2.warpAffine(canvas, matrix, canvas.shape[1::-1], flags=cv2.INTER_LINEAR)
    after = estimator.estimate_image(rotated)
    change = after - before
    # measured change (yaw, pitch, roll): +15 -> (0.4, 0.2, -15.4); -15 -> (-1.3, 0.0, 15.0)
    assert abs(change[2] + degrees) < 1.5
    assert np.all(np.abs(change[:2]) < 3)


@pytest.mark.parametrize("camera_turn", [(10.0, 0.0), (-10.0, 0.0), (0.0, 10.0), (0.0, -10.0)])
def test_pure_camera_rotation_changes_pose_by_that_rotation(estimator, tom_hanks, camera_turn):
    """Warping by K R K^-1 renders exactly what a camera turned by R about its centre sees,
    whatever the scene's depth, so the face's pose in that view is R @ R_before: on real
    landmarks, the estimate must follow the pinhole camera it assumes, with these signs."""
    canvas = _canvas(tom_hanks, 224)
    height, width = canvas.shape[:2]
    to_camera = pose.CAMERA_TO_PAPER_SIGNS  # its own inverse: back to solve_head_pose's signs
    before = estimator.estimate_image(canvas) * to_camera
    turn = pose.rotation_from_angles(*camera_turn, 0.0)
    camera = pose.camera_matrix(width, height)
    homography = camera @ turn @ np.linalg.inv(camera)
    rendered = cv2.warpPerspective(
        canvas, homography, (width, height), flags=cv2.INTER_LINEAR, borderValue=(110,) * 3
    )
    after = estimator.estimate_image(rendered) * to_camera
    expected = pose.angles_from_rotation(turn @ pose.rotation_from_angles(*before))
    # measured |after - expected| <= 0.9 deg; the change itself is ~10 deg
    np.testing.assert_allclose(after, expected, atol=2.0)
    turned_axis = 0 if camera_turn[0] else 1
    assert abs((after - before)[turned_axis] - sum(camera_turn)) < 2.0


def test_no_face_is_not_found(estimator, tom_hanks):
    grey = np.full((300, 400, 3), 128, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    angles, found = estimator.estimate([grey, tom_hanks, noise])
    assert angles.shape == (3, 3) and angles.dtype == np.float32
    np.testing.assert_array_equal(found, [False, True, False])
    np.testing.assert_array_equal(angles[[0, 2]], 0)
    np.testing.assert_allclose(angles[1], estimator.estimate_image(tom_hanks), rtol=1e-6)


def test_pose_files_rows_status_and_cache(estimator, tom_hanks, tmp_path):
    face_path, blank_path, broken_path = (
        tmp_path / "face.png",
        tmp_path / "blank.png",
        tmp_path / "broken.png",
    )
    cv2.imwrite(str(face_path), tom_hanks[..., ::-1])
    cv2.imwrite(str(blank_path), np.full((200, 200, 3), 90, dtype=np.uint8))
    broken_path.write_bytes(b"\x89PNG not really")
    paths = [face_path, blank_path, broken_path]
    rows, status = pose.estimate_pose_files(estimator, paths)
    assert rows.shape == (3, 3)
    np.testing.assert_array_equal(status, [STATUS_OK, STATUS_NO_FACE, STATUS_UNREADABLE])
    np.testing.assert_allclose(rows[0], estimator.estimate_image(tom_hanks), atol=1e-5)
    np.testing.assert_array_equal(rows[1:], 0)

    calls = []

    def compute(batch):
        calls.append(len(batch))
        return pose.estimate_pose_files(estimator, batch)

    cache = tmp_path / "pose_cache.npz"
    first = cached_rows(paths, compute, cache)
    second = cached_rows(paths, compute, cache)
    assert calls == [3]  # the second pass is read from the cache
    for got in (first, second):
        np.testing.assert_allclose(got[0], rows)
        np.testing.assert_array_equal(got[1], status)


# ------------------------------------------------------------------ spread statistics


def test_pose_spread_matches_numpy():
    angles = np.array(
        [
            [10.0, -5.0, 1.0],
            [-20.0, 3.0, 2.0],
            [5.0, 0.0, -4.0],  # a: 3 faces
            [30.0, 10.0, 0.0],
            [36.0, 4.0, 8.0],  # b: 2 faces
            [-50.0, 20.0, 9.0],  # c: 1 face, no spread
        ]
    )
    identities = ["a", "a", "a", "b", "b", "c"]
    spread = pose.pose_spread(angles, identities)
    per_a, per_b = angles[:3].std(axis=0), angles[3:5].std(axis=0)
    for k, name in enumerate(pose.ANGLE_NAMES):
        assert spread["per_identity"]["a"][name] == pytest.approx(per_a[k])
        assert spread["per_identity"]["b"][name] == pytest.approx(per_b[k])
        assert spread[name]["mean"] == pytest.approx(np.mean([per_a[k], per_b[k]]))
        assert spread[name]["std"] == pytest.approx(np.std([per_a[k], per_b[k]]))
        assert spread["all_faces"][name]["std"] == pytest.approx(angles[:, k].std())
        assert spread["all_faces"][name]["mean"] == pytest.approx(angles[:, k].mean())
    assert spread["per_identity"]["a"]["n_faces"] == 3
    assert sorted(spread["per_identity"]) == ["a", "b"]
    assert spread["n_faces"] == 6 and spread["n_identities"] == 2
    assert spread["n_identities_too_few_faces"] == 1
    assert spread["identities_too_few_faces"] == ["c"]


def test_pose_spread_without_spread_and_bad_input():
    spread = pose.pose_spread(np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), ["x", "y"])
    assert spread["n_identities"] == 0 and spread["n_identities_too_few_faces"] == 2
    assert all(math.isnan(spread[name]["mean"]) for name in pose.ANGLE_NAMES)
    assert spread["all_faces"]["yaw"] == {"mean": 2.5, "std": 1.5}
    empty = pose.pose_spread(np.zeros((0, 3)), [])
    assert empty["n_faces"] == 0 and math.isnan(empty["all_faces"]["roll"]["mean"])
    with pytest.raises(ValueError, match="2 pose rows but 1 identities"):
        pose.pose_spread(np.zeros((2, 3)), ["x"])
