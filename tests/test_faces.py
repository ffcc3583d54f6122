"""faces.py: similarity transforms against skimage, the differentiable alignment against cv2's,
dlib's 68 -> 5 landmark mapping (iBUG-300W indices), the detectors on insightface's photos, and
the torch alignment inside the training step without host syncs or host-to-device copies (the
guard, tests/host_syncs.py, runs the code on the meta device, where every tensor made from host
data has to cross from the CPU and is seen)."""

import cv2
import numpy as np
import pytest
import torch
from face_photos import EYES, rgb, tom_hanks_canvas, upsampled_to_original
from host_syncs import HostTransferError, NoHostTransfers

import arcface
import faces


@pytest.fixture(scope="module")
def dlib_detector() -> faces.DlibFaceDetector:
    return faces.DlibFaceDetector()


# ---------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------
def test_similarity_transforms_match_skimage():
    from skimage.transform import SimilarityTransform

    rng = np.random.default_rng(0)
    sources = []
    for _ in range(4):
        angle, scale = rng.uniform(-0.6, 0.6), rng.uniform(0.3, 3.0)
        rotation = scale * np.array(
            [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
        )
        noise = rng.normal(0, 2.0, (5, 2))
        sources.append(faces.ARCFACE_DST @ rotation.T + rng.uniform(0, 300, 2) + noise)
    batched = faces.similarity_transform_torch(
        torch.from_numpy(np.stack(sources)), torch.from_numpy(faces.ARCFACE_DST).double()
    )
    for index, source in enumerate(sources):
        expected = SimilarityTransform.from_estimate(source, faces.ARCFACE_DST.astype(np.float64))
        matrix = faces.similarity_transform(source)
        np.testing.assert_allclose(matrix, expected.params[:2], atol=1e-9)
        np.testing.assert_allclose(batched[index].numpy(), matrix, atol=1e-9)
    np.testing.assert_allclose(
        faces.similarity_transform(faces.ARCFACE_DST), np.eye(2, 3), atol=1e-6
    )
    with pytest.raises(ValueError, match="degenerate"):
        faces.similarity_transform(np.ones((5, 2)))


def _template_in_image(angle_deg: float, scale: float, centre: tuple[float, float]) -> np.ndarray:
    """ARCFACE_DST rotated and scaled about the crop centre and moved to `centre`."""
    angle = np.deg2rad(angle_deg)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return (faces.ARCFACE_DST - 55.5) @ rotation.T + np.asarray(centre)


@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")  # inside insightface
def test_differentiable_alignment_matches_cv2_path():
    from insightface.utils.face_align import norm_crop

    image = rgb("t1.jpg")
    landmarks = np.stack(
        [_template_in_image(15, 1.7, (400.3, 300.7)), _template_in_image(-30, 0.8, (25.2, 860.4))]
    )  # the second crop runs over the image corner: black border on both paths
    images = torch.from_numpy(image).permute(2, 0, 1)[None].double().expand(2, -1, -1, -1)
    warped = faces.align_faces_torch(images, torch.from_numpy(landmarks))
    for index in range(2):
        expected = faces.align_face(image, landmarks[index])
        insightface_crop = norm_crop(image, landmarks[index].astype(np.float32))
        assert np.abs(expected.astype(int) - insightface_crop).max() <= 1  # float32 landmarks
        difference = np.abs(warped[index].permute(1, 2, 0).numpy() - expected)
        assert difference.max() <= 1.0 and difference.mean() < 0.4  # uint8 rounding of cv2
    assert (faces.align_face(image, landmarks[1]) == 0).all(axis=2).mean() > 0.2
    unit = images.float() / 127.5 - 1
    border = faces.align_faces_torch(unit, torch.from_numpy(landmarks).float(), fill=-1.0)
    expected = arcface.images_to_arcface_input(faces.align_face(image, landmarks[1])[None])
    assert (border[1] - expected[0]).abs().max() < 0.01


def test_alignment_gradients_reach_images_and_landmarks():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 2, 14, 16, generator=generator, dtype=torch.float64)
    landmarks = torch.from_numpy(
        np.stack([_template_in_image(10, 0.1, (7.3, 6.6)), _template_in_image(-5, 0.08, (8, 7))])
    ) + 0.01 * torch.rand(2, 5, 2, generator=generator, dtype=torch.float64)

    def crop(imgs: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return faces.align_faces_torch(imgs, points, size=10)

    images.requires_grad_(True)
    landmarks.requires_grad_(True)
    assert torch.autograd.gradcheck(crop, (images, landmarks), eps=1e-6, atol=1e-5, fast_mode=True)
    crop(images, landmarks).square().sum().backward()
    assert images.grad.abs().sum() > 0 and landmarks.grad.abs().sum() > 0


def test_torch_alignment_needs_no_host_values():
    # Meta tensors hold no data: any .item() / data-dependent branch would raise here.
    images = torch.empty(3, 3, 64, 80, device="meta")
    landmarks = torch.empty(3, 5, 2, device="meta")
    assert faces.align_faces_torch(images, landmarks).shape == (3, 3, 112, 112)
    with pytest.raises(ValueError, match="landmark sets"):
        faces.align_faces_torch(torch.zeros(2, 3, 8, 8), torch.zeros(1, 5, 2))


# ---------------------------------------------------------------------------------------------
# Real face detection (dlib HOG + 68 points from face-recognition-models)
# ---------------------------------------------------------------------------------------------
def _realigned_eyes(
    detector: faces.DlibFaceDetector, image: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Align the largest face and re-detect it on the crop upsampled 4x.

    Returns the re-detected eye centres and where the alignment transform put the first
    detection's eyes, both in 112x112 crop pixels.
    """
    landmarks = detector.detect_landmarks(image)
    assert landmarks is not None and landmarks.shape == (5, 2) and landmarks.dtype == np.float32
    matrix = faces.similarity_transform(landmarks)
    crop = faces.align_face(image, landmarks)
    big_crop = cv2.resize(crop, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
    redetected = detector.detect_landmarks(big_crop)
    assert redetected is not None
    mapped_eyes = landmarks[EYES] @ matrix[:, :2].T + matrix[:, 2]
    return upsampled_to_original(redetected, 4)[EYES], mapped_eyes


def _distances(points: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Euclidean distance per point."""
    return np.linalg.norm(points - reference, axis=1)


def test_dlib_landmarks_align_tom_hanks_onto_the_template(dlib_detector):
    canvas, scale, (top, left) = tom_hanks_canvas()
    landmarks = dlib_detector.detect_landmarks(canvas)
    in_original = upsampled_to_original(landmarks - np.array([left, top]), scale)
    # The photo is itself an ArcFace crop, so its own eyes sit on the template (FACTS: 1-2 px).
    assert _distances(in_original[EYES], faces.ARCFACE_DST[EYES]).max() < 3.0
    eyes, _ = _realigned_eyes(dlib_detector, canvas)
    assert _distances(eyes, faces.ARCFACE_DST[EYES]).max() < 3.0


def test_dlib_landmarks_align_every_face_in_t1(dlib_detector):
    image = rgb("t1.jpg")
    eyes, _ = _realigned_eyes(dlib_detector, image)  # the largest face of the group photo
    assert _distances(eyes, faces.ARCFACE_DST[EYES]).max() < 3.0
    boxes = list(dlib_detector.detector(image, 0))
    assert len(boxes) == 6
    for box in boxes:  # each face alone: a crop around it with a generous margin
        margin = box.width() // 2
        top, left = max(box.top() - margin, 0), max(box.left() - margin, 0)
        face_region = np.ascontiguousarray(
            image[top : box.bottom() + margin, left : box.right() + margin]
        )
        eyes, mapped_eyes = _realigned_eyes(dlib_detector, face_region)
        # The crop puts the eyes exactly where the transform says (measured: <= 3 px) ...
        assert _distances(eyes, mapped_eyes).max() < 4.0
        # ... and for these partly turned faces the 5-point least-squares fit trades eye
        # position against the nose / mouth residuals (measured: eyes 0.6-9.4 px off).
        assert _distances(eyes, faces.ARCFACE_DST[EYES]).mean() < 8.0


def test_dlib_returns_none_without_a_face_and_rejects_bad_images(dlib_detector):
    assert dlib_detector.detect_landmarks(np.full((200, 160, 3), 128, dtype=np.uint8)) is None
    with pytest.raises(ValueError, match="uint8"):
        dlib_detector.detect_landmarks(np.zeros((64, 64, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        dlib_detector.detect_landmarks(np.zeros((64, 64), dtype=np.uint8))


def test_insightface_detector_missing_pack_names_the_files(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        faces.InsightFaceDetector(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "buffalo_l" / "det_10g.onnx") in message and "dlib" in message
    with pytest.raises(FileNotFoundError, match="det_10g.onnx"):
        faces.build_face_detector("insightface", tmp_path)
    with pytest.raises(ValueError, match=r"\['auto', 'dlib', 'insightface'\]"):
        faces.build_face_detector("mtcnn", tmp_path)


def test_auto_detector_prefers_an_insightface_pack(tmp_path):
    assert isinstance(faces.build_face_detector("auto", tmp_path), faces.DlibFaceDetector)
    pack = tmp_path / "antelopev2"
    pack.mkdir()
    (pack / "scrfd_10g_bnkps.onnx").write_bytes(b"not an onnx model")
    assert faces.find_detector_pack(tmp_path) == "antelopev2"
    with pytest.raises(ValueError, match="scrfd_10g_bnkps.onnx"):
        faces.build_face_detector("auto", tmp_path)


def test_dlib_68_points_map_to_the_ibug_eye_nose_and_mouth_points():
    """iBUG-300W's 68-point markup (0-based): eyes 36-41 and 42-47, nose tip 30, mouth corners
    48 and 54; every point distinct, so a wrong index cannot go unnoticed."""
    points = np.stack([np.arange(68), 1000 + 7 * np.arange(68)], axis=1).astype(np.float32)
    five = faces.landmarks_68_to_5(points)
    expected = np.stack(
        [points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]]
    )
    np.testing.assert_array_equal(five, expected)
    assert five.shape == (5, 2)


# ---------------------------------------------------------------------------------------------
# No host copies in the step's alignment
# ---------------------------------------------------------------------------------------------
META = torch.device("meta")


@pytest.mark.parametrize(
    "make",
    [
        lambda x: torch.tensor([1.0, 2.0], device=x.device),
        lambda x: torch.as_tensor(faces.ARCFACE_DST, device=x.device),
        lambda x: torch.from_numpy(np.ones(3, np.float32)).to(x.device),
        lambda x: x.new_tensor([64.0, 80.0]),
        lambda x: x.copy_(torch.zeros(x.shape)),
        lambda x: x + torch.ones(x.shape).to(x.device),
        lambda x: x.cpu(),
        lambda x: x.sum().item(),
        lambda x: bool(x.sum() > 0),
        lambda x: x.nonzero(),
    ],
    ids=[
        "tensor-list",
        "as_tensor-numpy",
        "from_numpy-to",
        "new_tensor",
        "copy_-host",
        "to-device",
        "cpu",
        "item",
        "bool",
        "nonzero",
    ],
)
def test_the_guard_sees_every_host_copy_and_sync(make):
    x = torch.empty(3, device=META)
    with pytest.raises(HostTransferError), NoHostTransfers():
        make(x)


def test_the_guard_lets_device_work_and_python_operands_through():
    x = torch.empty(3, device=META)
    with NoHostTransfers() as guard:
        y = (x * 2.0 + torch.full((3,), 0.5, device=META)).clamp(max=1.0)
        z = torch.as_tensor(y) + torch.zeros(3, device=META)  # already there: no copy
    assert z.device == META and "aten.mul.Tensor" in guard.ops


def test_torch_alignment_makes_no_host_copies_once_its_template_is_on_the_device():
    """The ArcFace template is copied to a device once (the first call there); afterwards the
    alignment, forward and backward, is pure device work."""
    images = torch.empty(3, 3, 64, 80, device=META, requires_grad=True)
    landmarks = torch.empty(3, 5, 2, device=META)
    faces.align_faces_torch(images, landmarks)  # first call on this device: the constant
    with NoHostTransfers() as guard:
        aligned = faces.align_faces_torch(images, landmarks, fill=-1.0)
        aligned.sum().backward()
        faces.similarity_transform_torch(landmarks)
    assert aligned.shape == (3, 3, 112, 112)
    assert "aten.grid_sampler_2d_backward.default" in guard.ops
    assert faces.arcface_template_on(META) is faces.arcface_template_on(META)
