"""Frozen ArcFace identity encoder: IResNet / ONNX recognisers, 5-point alignment, face detection.

Conventions used throughout:
- images are RGB; numpy images are (H, W, 3) uint8, torch images are (B, 3, H, W) float;
- recogniser input is RGB 112x112 scaled to [-1, 1] (x / 127.5 - 1), made in exactly one place,
  `images_to_arcface_input`; embeddings are L2-normalised 512-d vectors;
- landmarks are (5, 2) pixel coordinates (x, y) with pixel centres at integer coordinates (the
  cv2 / dlib / insightface convention), ordered like `ARCFACE_DST`: image-left eye, image-right
  eye, nose, image-left mouth corner, image-right mouth corner.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import itertools
import pickle
import re
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fileio import file_sha256

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

# Residual blocks per stage, as in insightface recognition/arcface_torch/backbones/iresnet.py.
IRESNET_LAYERS = {
    "r18": [2, 2, 2, 2],
    "r34": [3, 4, 6, 3],
    "r50": [3, 4, 14, 3],
    "r100": [3, 13, 30, 3],
    "r200": [6, 26, 60, 6],
}
IRESNET_STAGE_CHANNELS = (64, 128, 256, 512)
TORCH_WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")
DEFAULT_FACE_MODELS_ROOT = Path("~/.insightface/models").expanduser()
DEFAULT_INSIGHTFACE_PACK = "buffalo_l"
PACK_DOWNLOAD_HINT = (
    "https://github.com/deepinsight/insightface/releases (model packs, e.g. buffalo_l.zip)"
)


# --------------------------------------------------------------------------------------------
# IResNet (key-for-key insightface arcface_torch)
# --------------------------------------------------------------------------------------------
def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Residual block: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, + shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-05)
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-05)
        self.prelu = nn.PReLU(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels, eps=1e-05)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=1e-05),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """ArcFace IResNet; state dict keys match insightface arcface_torch checkpoints exactly."""

    fc_scale = 7 * 7  # 112 input / 2^4 stride-2 stages = 7x7 final feature map

    def __init__(self, layers: Sequence[int], num_features: int = 512, dropout: float = 0.0):
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"IResNet needs 4 stage depths, got {list(layers)}")
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-05)
        self.prelu = nn.PReLU(64)
        in_channels = 64
        for stage, (depth, channels) in enumerate(
            zip(layers, IRESNET_STAGE_CHANNELS, strict=True), start=1
        ):
            blocks = [IBasicBlock(in_channels, channels, stride=2)]
            blocks += [IBasicBlock(channels, channels) for _ in range(depth - 1)]
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
            in_channels = channels
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        self.layers = list(layers)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """arcface_torch init: conv ~ N(0, 0.1), BN (1, 0), `features.weight` frozen at 1."""
        self.features.weight.requires_grad = False
        if self.conv1.weight.is_meta:  # shapes only (weights loaded later); normal_ on meta is slow
            return
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.ones_(self.features.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) RGB in [-1, 1] -> (B, num_features) raw (not normalised) features."""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)  # (B, 512 * 7 * 7)
        return self.features(self.fc(self.dropout(x)))


def build_iresnet(name: str, num_features: int = 512) -> IResNet:
    """IResNet by name (r18/r34/r50/r100/r200) with random arcface_torch initialisation."""
    if name not in IRESNET_LAYERS:
        raise ValueError(f"unknown IResNet {name!r}; options: {sorted(IRESNET_LAYERS)}")
    return IResNet(IRESNET_LAYERS[name], num_features=num_features)


_LAYER_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")
_IRESNET_STEM_KEYS = ("conv1.weight", "bn1.weight", "prelu.weight", "fc.weight", "features.weight")


def infer_iresnet_depth(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Depth name from the number of blocks per stage, i.e. 1 + max i over keys `layer{k}.{i}.`."""
    blocks = [0, 0, 0, 0]
    for key in state_dict:
        match = _LAYER_KEY.match(key)
        if match:
            stage, index = int(match.group(1)) - 1, int(match.group(2))
            blocks[stage] = max(blocks[stage], index + 1)
    if min(blocks) == 0:
        raise ValueError(
            "not an arcface_torch IResNet checkpoint: expected keys layer1..layer4.<i>.*, "
            f"found blocks per stage {blocks} (first keys: {list(state_dict)[:5]})"
        )
    for name, layers in IRESNET_LAYERS.items():
        if blocks == layers:
            return name
    options = {name: layers for name, layers in IRESNET_LAYERS.items()}
    raise ValueError(
        f"IResNet with blocks per stage {blocks} is not a known depth; known: {options}"
    )


def _format_keys(keys: Sequence[str], limit: int = 8) -> str:
    """First `limit` keys, plus how many more there are."""
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _check_iresnet_keys(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str
) -> None:
    """Raise ValueError naming missing / unexpected keys and shape mismatches."""
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state_dict and state_dict[key].shape != tensor.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_format_keys(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_format_keys(mismatched)}")
    if problems:
        raise ValueError(
            f"{source} is not an arcface_torch IResNet checkpoint loadable strictly; "
            + "; ".join(problems)
        )


def iresnet_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], source: str = "state dict"
) -> IResNet:
    """Strictly load an arcface_torch state dict into an IResNet of the inferred depth (eval)."""
    stem_missing = [key for key in _IRESNET_STEM_KEYS if key not in state_dict]
    if stem_missing:
        raise ValueError(
            f"{source} is not an arcface_torch IResNet checkpoint: missing {stem_missing} "
            f"(first keys: {list(state_dict)[:5]})"
        )
    name = infer_iresnet_depth(state_dict)
    num_features = int(state_dict["fc.weight"].shape[0])
    with torch.device("meta"):  # no allocation / random init: every tensor is overwritten below
        model = build_iresnet(name, num_features)
    expected = model.state_dict()
    state = dict(state_dict)
    # BatchNorm step counters are bookkeeping, absent from some exports; they never affect eval.
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    _check_iresnet_keys(state, expected, source)
    model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    return model.eval()


def _unwrap_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a checkpoint (plain, or under a common wrapper key)."""
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict_backbone", "state_dict", "model", "backbone"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{source} does not hold a state dict of tensors (got {type(obj).__name__})"
        )
    state = {str(key): value for key, value in obj.items()}
    if state and all(key.startswith("module.") for key in state):  # saved from DDP
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt (torch.load weights_only) or .safetensors file; clear if corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:
            raise ValueError(
                f"could not read {path} as safetensors ({err}); the file is truncated or corrupt: "
                "download or save it again"
            ) from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} is not a plain tensor checkpoint (torch.load weights_only=True refused it: "
            f"{str(err).splitlines()[0]}); save the backbone's state_dict() instead"
        ) from err
    except Exception as err:
        raise ValueError(
            f"could not read {path} as a torch checkpoint ({type(err).__name__}: {err}); "
            "the file is truncated or corrupt: download or save it again"
        ) from err
    return _unwrap_state_dict(obj, str(path))


def load_iresnet(path: str | Path, device: str | torch.device = "cpu") -> IResNet:
    """Strictly load an arcface_torch backbone checkpoint; depth inferred; eval mode."""
    state_dict = read_state_dict(path)
    return iresnet_from_state_dict(state_dict, source=str(path)).to(device).eval()


# --------------------------------------------------------------------------------------------
# ONNX recognisers (insightface packs, e.g. buffalo_l/w600k_r50.onnx) via onnx2torch
# --------------------------------------------------------------------------------------------
def _torchvision_unavailable(*args: object, **kwargs: object) -> None:
    """Stand-in for torchvision.ops functions; raises because torchvision is not installed."""
    raise RuntimeError(
        "this ONNX graph uses NMS/RoIAlign, which needs torchvision (not installed); "
        "an ArcFace recogniser never does: check that the file is a face recogniser"
    )


def _import_onnx2torch() -> types.ModuleType:
    """Import onnx2torch even without torchvision.

    onnx2torch imports torchvision at module level only for its NMS and RoIAlign converters.
    torchvision cannot be installed beside the torch this project pins, and IResNet graphs never
    contain those ops, so when torchvision is missing a placeholder whose ops raise a clear error
    is put in sys.modules for the duration of the import only.
    """
    try:
        return importlib.import_module("onnx2torch")
    except ModuleNotFoundError as err:
        if err.name is None or not err.name.startswith("torchvision"):
            raise ImportError(
                f"loading an .onnx recogniser needs onnx2torch ({err}): "
                "`pip install --no-deps onnx2torch` (it needs only torch and onnx)"
            ) from err
    for module_name in [name for name in sys.modules if name.split(".")[0] == "onnx2torch"]:
        del sys.modules[module_name]  # drop the half-imported package before retrying
    placeholder = types.ModuleType("torchvision")
    placeholder_ops = types.ModuleType("torchvision.ops")
    for op_name in ("nms", "batched_nms", "box_convert", "roi_align"):
        setattr(placeholder_ops, op_name, _torchvision_unavailable)
    placeholder.ops = placeholder_ops
    saved = {name: sys.modules.get(name) for name in ("torchvision", "torchvision.ops")}
    sys.modules.update({"torchvision": placeholder, "torchvision.ops": placeholder_ops})
    try:
        return importlib.import_module("onnx2torch")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _onnx_expects_pixels(graph: object) -> bool:
    """insightface's rule: Sub and Mul among the first 8 nodes = mxnet model taking 0..255 input."""
    names = [node.name for node in graph.node[:8]]
    has_sub = any(name.startswith(("Sub", "_minus")) for name in names)
    has_mul = any(name.startswith(("Mul", "_mul")) for name in names)
    return has_sub and has_mul


def _inline_initializer_identities(model: object) -> None:
    """Replace `Identity(initializer)` nodes by initializer copies, in place.

    torch.onnx.export deduplicates equal weights (e.g. freshly initialised BatchNorm biases) into
    Identity nodes, which onnx2torch cannot use as Conv / PRelu weights.
    """
    from onnx import numpy_helper

    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    kept_nodes = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers:
            array = numpy_helper.to_array(initializers[node.input[0]])
            copy = numpy_helper.from_array(array, name=node.output[0])
            model.graph.initializer.append(copy)
            initializers[copy.name] = copy
        else:
            kept_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept_nodes)


def load_onnx_recogniser(path: str | Path) -> tuple[nn.Module, bool, int]:
    """ONNX recogniser -> (differentiable torch module in eval mode, expects 0..255 input, dim)."""
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path))
    except Exception as err:
        raise ValueError(
            f"could not read {path} as an ONNX model ({type(err).__name__}: {err}); "
            "the file is truncated or corrupt: download or export it again"
        ) from err
    # dim_value 0 = a dynamic axis; only fixed axes that disagree with (B, 3, 112, 112) are errors
    input_dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    channels_height_width = (3, ARCFACE_SIZE, ARCFACE_SIZE)
    if len(input_dims) != 4 or any(
        have and have != want
        for have, want in zip(input_dims[1:], channels_height_width, strict=True)
    ):
        raise ValueError(
            f"{path} takes input of shape {input_dims}; ArcFace needs (B, 3, 112, 112)"
        )
    output_dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    onnx2torch = _import_onnx2torch()
    _inline_initializer_identities(model)
    try:
        module = onnx2torch.convert(model)
    except Exception as err:
        raise ValueError(
            f"onnx2torch could not convert {path}: {type(err).__name__}: {err}"
        ) from err
    # Converted modules start in training mode: without eval() BatchNorm uses batch statistics.
    module.eval()
    embedding_dim = output_dims[-1] if output_dims and output_dims[-1] > 0 else 512
    return module, _onnx_expects_pixels(model.graph), int(embedding_dim)


# --------------------------------------------------------------------------------------------
# Frozen encoder
# --------------------------------------------------------------------------------------------
class ArcFaceEncoder(nn.Module):
    """Frozen recogniser: (B, 3, 112, 112) RGB in [-1, 1] -> (B, D) L2-normalised embeddings.

    Parameters never require grad and the module stays in eval mode (train() is a no-op), but
    the forward pass is differentiable with respect to its input (for the identity losses).
    `name` identifies the weights (file stem + sha256 prefix) for cache keys.
    """

    def __init__(
        self, backbone: nn.Module, name: str, embedding_dim: int = 512, expects_pixels: bool = False
    ):
        super().__init__()
        self.backbone = backbone
        self.name = name
        self.embedding_dim = embedding_dim
        self.expects_pixels = expects_pixels  # mxnet-style graphs normalise 0..255 input inside
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> ArcFaceEncoder:
        """Stay in eval mode: BatchNorm must keep its running statistics."""
        return super().train(False)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) in [-1, 1] -> (B, D) float32, e / ||e||_2."""
        if faces.ndim != 4 or tuple(faces.shape[1:]) != (3, ARCFACE_SIZE, ARCFACE_SIZE):
            raise ValueError(
                f"ArcFace input must be (B, 3, 112, 112) RGB in [-1, 1], got {tuple(faces.shape)}; "
                "align with align_face / align_faces_torch and use images_to_arcface_input"
            )
        reference = next(self.backbone.parameters(), None)
        if reference is None:
            reference = next(self.backbone.buffers())
        x = faces.to(device=reference.device, dtype=reference.dtype)
        if self.expects_pixels:
            x = (x + 1.0) * 127.5
        features = self.backbone(x)  # (B, D) raw
        return F.normalize(features.float(), dim=1)

    def embed(self, faces: torch.Tensor) -> torch.Tensor:
        """Alias of forward: L2-normalised embeddings of (B, 3, 112, 112) faces in [-1, 1]."""
        return self(faces)


def weights_name(path: str | Path) -> str:
    """Id of a weights file: sanitised file stem + '-' + first 12 hex digits of its sha256."""
    stem = re.sub(r"[^A-Za-z0-9_.]+", "_", Path(path).stem)
    return f"{stem}-{file_sha256(path)[:12]}"


def _torch_backbone(path: Path) -> tuple[nn.Module, bool, int]:
    """(IResNet, expects 0..255 input = False, embedding dim) from a torch/safetensors file."""
    model = load_iresnet(path)
    return model, False, model.fc.out_features


RECOGNISER_LOADERS: dict[str, Callable[[Path], tuple[nn.Module, bool, int]]] = {
    **{suffix: _torch_backbone for suffix in TORCH_WEIGHT_SUFFIXES},
    ".onnx": load_onnx_recogniser,
}


def load_arcface(
    weights: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ArcFaceEncoder:
    """Frozen encoder from arcface_torch weights (.pth/.pt/.safetensors) or an ONNX recogniser."""
    path = Path(weights).expanduser()
    if path.suffix not in RECOGNISER_LOADERS:
        raise ValueError(
            f"unsupported recogniser file {path}: expected one of {sorted(RECOGNISER_LOADERS)}"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"recogniser weights not found: {path} (an arcface_torch backbone.pth, e.g. "
            "ms1mv3_arcface_r100_fp16/backbone.pth, or an insightface pack's w600k_r50.onnx)"
        )
    backbone, expects_pixels, embedding_dim = RECOGNISER_LOADERS[path.suffix](path)
    encoder = ArcFaceEncoder(backbone, weights_name(path), embedding_dim, expects_pixels)
    return encoder.to(device=device, dtype=dtype)


def images_to_arcface_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, 112, 112, 3) RGB uint8 -> (B, 3, 112, 112) float32 in [-1, 1]: (x / 255 - 0.5) / 0.5."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 RGB images, got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or tuple(images.shape[1:]) != (ARCFACE_SIZE, ARCFACE_SIZE, 3):
        raise ValueError(
            f"expected aligned faces of shape (B, 112, 112, 3), got {tuple(images.shape)}"
        )
    return images.permute(0, 3, 1, 2).float().div(255.0).sub(0.5).div(0.5)


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

    Same formula as `similarity_transform`; dst defaults to ARCFACE_DST.
    """
    dst = torch.as_tensor(ARCFACE_DST) if dst is None else dst
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
    template = torch.as_tensor(arcface_template(size), device=landmarks.device)
    to_crop = similarity_transform_torch(landmarks.to(work_dtype), template)  # src px -> crop px
    to_image = _invert_affine(to_crop)  # crop px -> src px
    # theta maps normalised crop coords u to normalised source coords:
    # crop px = (size * u + size - 1) / 2,   source u = (2 * px + 1) / W - 1   (align_corners=False)
    half = (size - 1) / 2.0
    linear = to_image[:, :, :2] * (size / 2.0)
    shift = to_image[:, :, :2].sum(2) * half + to_image[:, :, 2]  # (B, 2)
    extent = torch.tensor([width, height], dtype=work_dtype, device=landmarks.device)
    theta = torch.cat(
        [linear * 2.0 / extent[:, None], ((2.0 * shift + 1.0) / extent - 1.0)[..., None]], 2
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


# --------------------------------------------------------------------------------------------
# Detect + align + embed
# --------------------------------------------------------------------------------------------
def _encoder_device(encoder: nn.Module) -> torch.device:
    """Device of the encoder's first parameter or buffer (CPU if it has none)."""
    first = next(itertools.chain(encoder.parameters(), encoder.buffers()), None)
    return torch.device("cpu") if first is None else first.device


def embed_face_images(
    images: Sequence[np.ndarray],
    detector: FaceDetector,
    encoder: ArcFaceEncoder,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Detect, align and embed: -> (N, D) float32 unit embeddings (zero rows where no face), found.

    `found` is an (N,) bool mask; callers count and report the images without a face.
    """
    found = np.zeros(len(images), dtype=bool)
    crops, rows = [], []
    for index, image in enumerate(images):
        landmarks = detector.detect_landmarks(image)
        if landmarks is not None:
            crops.append(align_face(image, landmarks))
            rows.append(index)
            found[index] = True
    embeddings = np.zeros((len(images), getattr(encoder, "embedding_dim", 512)), dtype=np.float32)
    device = _encoder_device(encoder)
    with torch.inference_mode():
        for start in range(0, len(crops), batch_size):
            batch = images_to_arcface_input(np.stack(crops[start : start + batch_size]))
            batch_rows = rows[start : start + batch_size]
            embeddings[batch_rows] = encoder(batch.to(device)).float().cpu().numpy()
    return embeddings, found
