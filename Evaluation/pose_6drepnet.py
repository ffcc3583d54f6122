"""6DRepNet head pose (Hempel, Abdelrahman, Al-Hamadi, ICIP 2022, arXiv 2202.12555): the paper's
pose estimator, key for key as the official github.com/thohemp/6DRepNet (the `sixdrepnet` PyPI
package the ID-Booth notebook uses, which needs torchvision and is not installed here).

Official model (`sixdrepnet/model.py`, `backbone/repvgg.py`, `utils.py`, `regressor.py`):
- RepVGG-B1g2 in deploy form (each block one 3x3 conv with bias + ReLU; blocks 2, 4, ..., 26
  grouped in 2): `layer0` (3 -> 64, stride 2), `layer1` 4 x 128, `layer2` 6 x 256, `layer3`
  16 x 512, `layer4` 1 x 2048 (first block of each stage stride 2); global average pool;
  `linear_reg` = Linear(2048, 6). Checkpoint keys `layer0.rbr_reparam.{weight,bias}`,
  `layer<s>.<i>.rbr_reparam.{weight,bias}`, `linear_reg.{weight,bias}`; the released
  `6DRepNet_300W_LP_AFLW2000.pth` is a plain deploy-form state dict, loaded strictly.
- The 6 outputs are two 3-vectors turned into a rotation by Gram-Schmidt (columns x, y, z);
  Euler angles: pitch = atan2(R21, R22), yaw = atan2(-R20, sqrt(R00^2 + R10^2)),
  roll = atan2(R10, R00), degrees (`compute_euler_angles_from_rotation_matrices`).
- Input (`SixDRepNet_Detector.predict`): BGR -> RGB, PIL bilinear resize of the shorter side to
  224, centre crop 224, /255, ImageNet mean/std.

The ID-Booth notebook (`Evaluation/PoseEstimation/estimate_head_pose_ID-Booth.ipynb`) feeds it
aligned face crops padded by 30 black pixels on every side (`cv2.copyMakeBorder`).

Angle convention (6DRepNet's, the paper's): yaw > 0 = the face turned towards the image's left
(the subject's right: `draw_axis` draws the face's z axis at x = sin(-yaw)); pitch > 0 = looking
up; roll > 0 = tilted clockwise as displayed (the image-right eye lower).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

BLOCKS_PER_STAGE = (4, 6, 16, 1)  # RepVGG-B1: num_blocks
STAGE_WIDTHS = (128, 256, 512, 2048)  # 64, 128, 256, 512 x width multipliers (2, 2, 2, 4)
STEM_WIDTH = 64  # min(64, 64 * 2)
GROUPED_BLOCKS = frozenset(range(2, 27, 2))  # g2_map: 1-based block index after the stem
INPUT_SIZE = 224
CROP_PADDING = 30  # pixels of black border around each aligned crop (the ID-Booth notebook)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_HINT = (
    "the released 6DRepNet_300W_LP_AFLW2000.pth (github.com/thohemp/6DRepNet, 'Pretrained "
    "weights'; the file sixdrepnet's SixDRepNet() downloads)"
)


class RepVGGBlock(nn.Module):
    """Deploy-form RepVGG block: ReLU(conv3x3(x) + bias) (the official `se` is Identity)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int = 1):
        super().__init__()
        self.rbr_reparam = nn.Conv2d(
            in_channels, out_channels, 3, stride=stride, padding=1, groups=groups, bias=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.rbr_reparam(x))


def _stage(in_channels: int, width: int, blocks: int, first_index: int) -> nn.Sequential:
    """One RepVGG stage: stride 2 then 1s; block `first_index + i` grouped if in GROUPED_BLOCKS."""
    layers = []
    for offset in range(blocks):
        groups = 2 if first_index + offset in GROUPED_BLOCKS else 1
        layers.append(RepVGGBlock(in_channels, width, 2 if offset == 0 else 1, groups))
        in_channels = width
    return nn.Sequential(*layers)


def rotation_from_6d(six: torch.Tensor) -> torch.Tensor:
    """(B, 6) -> (B, 3, 3) rotation, columns x, y, z (Zhou et al.'s Gram-Schmidt, as official)."""
    x = six[:, 0:3] / six[:, 0:3].norm(dim=1, keepdim=True).clamp_min(1e-8)
    z = torch.linalg.cross(x, six[:, 3:6])
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-8)
    y = torch.linalg.cross(z, x)
    return torch.stack([x, y, z], dim=2)


def euler_from_rotation(rotation: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) -> (B, 3) pitch, yaw, roll in degrees (official, incl. its gimbal-lock branch)."""
    r = rotation
    sy = torch.sqrt(r[:, 0, 0] ** 2 + r[:, 1, 0] ** 2)
    singular = sy < 1e-6
    pitch = torch.where(
        singular, torch.atan2(-r[:, 1, 2], r[:, 1, 1]), torch.atan2(r[:, 2, 1], r[:, 2, 2])
    )
    yaw = torch.atan2(-r[:, 2, 0], sy)
    roll = torch.where(singular, torch.zeros_like(sy), torch.atan2(r[:, 1, 0], r[:, 0, 0]))
    return torch.rad2deg(torch.stack([pitch, yaw, roll], dim=1))


class SixDRepNet(nn.Module):
    """RepVGG-B1g2 (deploy form) + global pool + Linear(2048, 6) -> (B, 3, 3) head rotation."""

    def __init__(self):
        super().__init__()
        self.layer0 = RepVGGBlock(3, STEM_WIDTH, stride=2)
        in_channels, first_index = STEM_WIDTH, 1
        stages = zip(STAGE_WIDTHS, BLOCKS_PER_STAGE, strict=True)
        for stage, (width, blocks) in enumerate(stages, start=1):
            setattr(self, f"layer{stage}", _stage(in_channels, width, blocks, first_index))
            in_channels, first_index = width, first_index + blocks
        self.linear_reg = nn.Linear(STAGE_WIDTHS[-1], 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) ImageNet-normalised RGB -> (B, 3, 3) rotation matrices."""
        for stage in (self.layer0, self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return rotation_from_6d(self.linear_reg(x.mean(dim=(2, 3))))


def load_sixdrepnet(path: str | Path, device: str | torch.device = "cpu") -> SixDRepNet:
    """Strictly load a 6DRepNet deploy-form state dict (torch.load weights_only=True), eval mode."""
    from arcface import check_strict_keys, read_state_dict

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"6DRepNet weights not found: {path}; expected {WEIGHTS_HINT}")
    state = read_state_dict(path)
    with torch.device("meta"):
        model = SixDRepNet()
    check_strict_keys(state, model.state_dict(), str(path), "a deploy-form 6DRepNet")
    model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    if not all(torch.isfinite(value).all() for value in state.values()):
        raise ValueError(f"{path}: non-finite weights; the weights file is broken")
    return model.to(device).eval()


def pad_crop(face: np.ndarray, padding: int = CROP_PADDING) -> np.ndarray:
    """(H, W, 3) uint8 -> (H + 2p, W + 2p, 3): black border (cv2.BORDER_CONSTANT, as official)."""
    return np.pad(face, ((padding, padding), (padding, padding), (0, 0)))


def resized_size(height: int, width: int) -> tuple[int, int]:
    """(width, height) of torchvision's Resize(224): shorter side 224, longer int(224 * ratio)."""
    if width <= height:
        return INPUT_SIZE, int(INPUT_SIZE * height / width)
    return int(INPUT_SIZE * width / height), INPUT_SIZE


def preprocess(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, 224, 224): Resize(224) (PIL bilinear), CenterCrop(224),
    ToTensor, ImageNet Normalize, as torchvision does in the official `predict`."""
    resized = np.asarray(
        Image.fromarray(image).resize(resized_size(*image.shape[:2]), Image.BILINEAR)
    )
    top = int(round((resized.shape[0] - INPUT_SIZE) / 2.0))
    left = int(round((resized.shape[1] - INPUT_SIZE) / 2.0))
    crop = resized[top : top + INPUT_SIZE, left : left + INPUT_SIZE]
    tensor = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return (tensor - mean[:, None, None]) / std[:, None, None]


def state_dict_shapes() -> Mapping[str, tuple[int, ...]]:
    """Key -> shape of the official deploy-form checkpoint (58 tensors)."""
    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in SixDRepNet().state_dict().items()}


def predict_angles(
    model: SixDRepNet, crops: Sequence[np.ndarray], batch_size: int = 16
) -> np.ndarray:
    """Padded RGB crops -> (N, 3) float32 pitch, yaw, roll degrees (6DRepNet's order and signs)."""
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, len(crops), batch_size):
            batch = torch.stack([preprocess(c) for c in crops[start : start + batch_size]])
            out.append(euler_from_rotation(model(batch.to(device)).float()).cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 3), np.float32)
