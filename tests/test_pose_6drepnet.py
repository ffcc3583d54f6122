"""Evaluation/pose_6drepnet.py: the official 6DRepNet key layout (random weights saved as the
released deploy-form checkpoint, loaded strictly), its forward against a functional reference,
the official 6D -> rotation -> Euler formulas, the official preprocessing, and the paper's crop
and angle order / signs through pose.SixDRepNetEstimator on a real face."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.spatial.transform import Rotation
from test_arcface import rgb, tom_hanks_canvas

import pose
import pose_6drepnet as sixd

# The official RepVGG-B1g2 deploy layout, written out from backbone/repvgg.py: (stage, blocks,
# out channels); blocks numbered from 1 after the stem, even numbers (2 ... 26) grouped in 2.
OFFICIAL_STAGES = ((1, 4, 128), (2, 6, 256), (3, 16, 512), (4, 1, 2048))


def official_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of 6DRepNet_300W_LP_AFLW2000.pth, from the official recipe."""
    shapes = {"layer0.rbr_reparam.weight": (64, 3, 3, 3), "layer0.rbr_reparam.bias": (64,)}
    in_channels, number = 64, 1
    for stage, blocks, width in OFFICIAL_STAGES:
        for index in range(blocks):
            groups = 2 if number % 2 == 0 and number <= 26 else 1
            prefix = f"layer{stage}.{index}.rbr_reparam"
            shapes[f"{prefix}.weight"] = (width, in_channels // groups, 3, 3)
            shapes[f"{prefix}.bias"] = (width,)
            in_channels, number = width, number + 1
    return shapes | {"linear_reg.weight": (6, 2048), "linear_reg.bias": (6,)}


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """He-initialised random tensors in the official layout (activations stay finite)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_shapes().items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        scale = math.sqrt(2.0 / fan_in) if key.endswith("weight") else 0.01
        state[key] = torch.randn(shape, generator=generator) * scale
    return state


def official_rotation_from_6d(six: np.ndarray) -> np.ndarray:
    """utils.compute_rotation_matrix_from_ortho6d, in numpy."""
    x = six[:, 0:3] / np.maximum(np.linalg.norm(six[:, 0:3], axis=1, keepdims=True), 1e-8)
    z = np.cross(x, six[:, 3:6])
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-8)
    return np.stack([x, np.cross(z, x), z], axis=2)


def official_euler(r: np.ndarray) -> np.ndarray:
    """utils.compute_euler_angles_from_rotation_matrices (non-singular branch) in degrees."""
    sy = np.sqrt(r[:, 0, 0] ** 2 + r[:, 1, 0] ** 2)
    angles = [np.arctan2(r[:, 2, 1], r[:, 2, 2]), np.arctan2(-r[:, 2, 0], sy)]
    return np.degrees(np.stack([*angles, np.arctan2(r[:, 1, 0], r[:, 0, 0])], axis=1))


def official_get_r(pitch: float, yaw: float, roll: float) -> np.ndarray:
    """utils.get_R: Rz(roll) @ Ry(yaw) @ Rx(pitch), degrees in."""
    return Rotation.from_euler("ZYX", [roll, yaw, pitch], degrees=True).as_matrix()


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The deploy-form network straight from the state dict: (B, 6) before Gram-Schmidt."""
    for key in [k for k in state if k.endswith("rbr_reparam.weight")]:
        weight, bias = state[key], state[key.replace("weight", "bias")]
        first_of_stage = key.startswith("layer0.") or ".0.rbr" in key
        groups = x.shape[1] // weight.shape[1]
        x = F.relu(
            F.conv2d(x, weight, bias, stride=2 if first_of_stage else 1, padding=1, groups=groups)
        )
    return F.linear(x.mean(dim=(2, 3)), state["linear_reg.weight"], state["linear_reg.bias"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("sixd") / "6DRepNet_300W_LP_AFLW2000.pth"
    state = random_state()
    torch.save(state, path)
    return path, state


def test_keys_and_shapes_are_the_official_ones():
    assert sixd.state_dict_shapes() == official_shapes()
    assert len(official_shapes()) == 58


def test_random_checkpoint_loads_strictly_and_matches_the_reference(checkpoint):
    path, state = checkpoint
    model = sixd.load_sixdrepnet(path)
    assert not model.training
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())
    x = torch.randn((2, 3, 224, 224), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rotation = model(x)
        six = reference_forward(state, x)
    expected = official_rotation_from_6d(six.double().numpy())
    np.testing.assert_allclose(rotation.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(
        sixd.euler_from_rotation(rotation).numpy(), official_euler(expected), atol=1e-3
    )


def test_checkpoints_of_another_layout_are_refused(tmp_path, checkpoint):
    _, state = checkpoint
    extra = tmp_path / "extra.pth"
    torch.save(state | {"layer4.0.rbr_dense.conv.weight": torch.zeros(1)}, extra)
    with pytest.raises(ValueError, match="unexpected keys.*rbr_dense"):
        sixd.load_sixdrepnet(extra)
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in state.items() if k != "linear_reg.bias"}, missing)
    with pytest.raises(ValueError, match="missing keys.*linear_reg.bias"):
        sixd.load_sixdrepnet(missing)
    broken = tmp_path / "nan.pth"
    torch.save(state | {"linear_reg.bias": torch.full((6,), float("nan"))}, broken)
    with pytest.raises(ValueError, match="non-finite weights; the weights file is broken"):
        sixd.load_sixdrepnet(broken)
    with pytest.raises(FileNotFoundError, match="6DRepNet_300W_LP_AFLW2000.pth"):
        sixd.load_sixdrepnet(tmp_path / "absent.pth")


def test_6d_and_euler_conversions_follow_the_official_formulas():
    rng = np.random.default_rng(0)
    for pitch, yaw, roll in rng.uniform([-60, -85, -60], [60, 85, 60], size=(50, 3)):
        rotation = official_get_r(pitch, yaw, roll)
        six = torch.tensor(np.concatenate([rotation[:, 0], rotation[:, 1]])[None] * 3.0)
        recovered = sixd.rotation_from_6d(six)
        np.testing.assert_allclose(recovered[0].numpy(), rotation, atol=1e-9)
        np.testing.assert_allclose(
            sixd.euler_from_rotation(recovered)[0].numpy(), [pitch, yaw, roll], atol=1e-6
        )
    noisy = torch.tensor(rng.normal(size=(20, 6)))
    rotations = sixd.rotation_from_6d(noisy).numpy()
    np.testing.assert_allclose(rotations, official_rotation_from_6d(noisy.numpy()), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(rotations), 1.0, atol=1e-9)


def test_preprocessing_is_the_official_pad_resize_crop_normalise():
    face = rgb("t1.jpg")[100:212, 100:212]  # (112, 112, 3)
    padded = sixd.pad_crop(face)
    assert padded.shape == (172, 172, 3)
    assert padded[:30].max() == 0 and padded[-30:].max() == 0 and padded[:, :30].max() == 0
    np.testing.assert_array_equal(padded[30:-30, 30:-30], face)
    tensor = sixd.preprocess(padded)
    resized = np.asarray(Image.fromarray(padded).resize((224, 224), Image.BILINEAR)) / 255.0
    expected = (resized - np.array(sixd.IMAGENET_MEAN)) / np.array(sixd.IMAGENET_STD)
    np.testing.assert_allclose(tensor.permute(1, 2, 0).numpy(), expected, atol=1e-5)
    wide = sixd.preprocess(np.zeros((100, 300, 3), dtype=np.uint8))  # 224 x 672, centre crop
    assert wide.shape == (3, 224, 224)
    assert sixd.resized_size(100, 300) == (672, 224) and sixd.resized_size(300, 100) == (224, 672)


def constant_pose_checkpoint(path, pitch: float, yaw: float, roll: float):
    """Random backbone, a head that always outputs the 6D code of get_R(pitch, yaw, roll)."""
    state = random_state(seed=2)
    rotation = official_get_r(pitch, yaw, roll)
    state["linear_reg.weight"] = torch.zeros((6, 2048))
    six = np.concatenate([rotation[:, 0], rotation[:, 1]])
    state["linear_reg.bias"] = torch.tensor(six, dtype=torch.float32)
    torch.save(state, path)
    return path


def test_estimator_reports_yaw_pitch_roll_in_the_papers_signs_on_a_real_face(tmp_path):
    """A head fixed at pitch 10, yaw 25, roll -5 (official get_R) reads back in ANGLE_NAMES
    order; yaw 25 is a face turned to the image's left (draw_axis: nose axis at x = sin(-yaw)),
    the sign pose.PoseEstimator gives a real face turned that way (test_pose's mirror test)."""
    weights = constant_pose_checkpoint(tmp_path / "fixed.pth", pitch=10.0, yaw=25.0, roll=-5.0)
    estimator = pose.build_pose_estimator(weights, face_detector="dlib")
    assert estimator.comparable_with_paper and estimator.name.endswith("-dlib-hog68-pad30")
    canvas, _, _ = tom_hanks_canvas()
    blank = np.full((200, 200, 3), 90, dtype=np.uint8)
    angles, found = estimator.estimate([canvas, blank])
    assert found.tolist() == [True, False]
    np.testing.assert_allclose(angles[0], [25.0, 10.0, -5.0], atol=1e-3)
    assert angles[1].tolist() == [0.0, 0.0, 0.0]
    nose_axis_x = math.sin(-math.radians(angles[0][0]))  # official draw_axis
    assert nose_axis_x < 0  # towards the image's left


def test_aligned_crops_without_a_detector(tmp_path):
    weights = constant_pose_checkpoint(tmp_path / "fixed.pth", pitch=-8.0, yaw=-30.0, roll=4.0)
    estimator = pose.SixDRepNetEstimator(sixd.load_sixdrepnet(weights))
    assert estimator.name == "6drepnet-unnamed-aligned-pad30"
    named = pose.build_pose_estimator(weights, face_detector=None)
    assert named.name.startswith("6drepnet-fixed-") and named.name.endswith("-aligned-pad30")
    released = tmp_path / "6DRepNet_300W_LP_AFLW2000.pth"
    released.write_bytes(weights.read_bytes())
    label = pose.build_pose_estimator(released, face_detector=None).name
    assert label.startswith("6drepnet-300W_LP_AFLW2000-")  # not doubled
    angles, found = estimator.estimate([rgb("Tom_Hanks_54745.png")])
    assert found.all()
    np.testing.assert_allclose(angles[0], [-30.0, -8.0, 4.0], atol=1e-3)
    with pytest.raises(ValueError, match="aligned 112x112"):
        estimator.estimate([np.zeros((50, 60, 3), dtype=np.uint8)])
