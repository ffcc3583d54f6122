"""Face recognition: IResNet (arcface_torch checkpoints) and ONNX recognisers behind one frozen
encoder, which maps aligned faces to L2-normalised embeddings.

Conventions: recogniser input is an aligned RGB 112x112 face (faces.align_face /
faces.align_faces_torch) scaled to [-1, 1] (x / 127.5 - 1), made in exactly one place,
`images_to_arcface_input`; embeddings are L2-normalised, 512-d for ArcFace.
"""

from __future__ import annotations

import importlib
import pickle
import re
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from faces import ARCFACE_SIZE
from fileio import file_sha256
from runs import format_list

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


def check_strict_keys(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    source: str,
    kind: str = "an arcface_torch IResNet",
) -> None:
    """ValueError naming missing / unexpected keys and shape mismatches of a checkpoint that
    must load strictly into a model with the `expected` state dict."""
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state_dict and state_dict[key].shape != tensor.shape
    ]
    problems = [
        f"{label}: {format_list(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch", mismatched),
        )
        if keys
    ]
    if problems:
        raise ValueError(
            f"{source} is not {kind} checkpoint loadable strictly; " + "; ".join(problems)
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
    check_strict_keys(state, expected, source)
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
    if len(model.graph.input) != 1 or len(model.graph.output) < 1 or not model.graph.node:
        raise ValueError(
            f"{path} is not an ONNX face recogniser: a recogniser has one image input and an "
            f"embedding output ({len(model.graph.input)} inputs, {len(model.graph.output)} "
            f"outputs, {len(model.graph.node)} nodes)"
        )
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
        x = faces.to(device=self.device, dtype=self.dtype)
        if self.expects_pixels:
            x = (x + 1.0) * 127.5
        features = self.backbone(x)  # (B, D) raw
        return F.normalize(features.float(), dim=1)

    def embed(self, faces: torch.Tensor) -> torch.Tensor:
        """Alias of forward: L2-normalised embeddings of (B, 3, 112, 112) faces in [-1, 1]."""
        return self(faces)

    @property
    def device(self) -> torch.device:
        """Where the recogniser's weights live (its input is moved there)."""
        return module_device_dtype(self.backbone)[0]

    @property
    def dtype(self) -> torch.dtype:
        """The recogniser's floating weight dtype (its input is cast to it)."""
        return module_device_dtype(self.backbone)[1]


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a module's first floating tensor (CPU float32 without any)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


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
    _check_embeds(encoder, path)
    return encoder.to(device=device, dtype=dtype)


def _check_embeds(encoder: ArcFaceEncoder, path: Path) -> None:
    """ValueError unless one aligned face gives one finite (1, D) embedding (a probe forward)."""
    try:
        with torch.inference_mode():
            probe = encoder(torch.zeros(1, 3, ARCFACE_SIZE, ARCFACE_SIZE))
    except Exception as error:  # a graph of another model fails in ways of its own
        raise ValueError(
            f"{path} does not run as a face recogniser on a (1, 3, 112, 112) face "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error
    if tuple(probe.shape) != (1, encoder.embedding_dim):
        raise ValueError(
            f"{path} gives output of shape {tuple(probe.shape)} for one face; a recogniser "
            f"gives one embedding (1, {encoder.embedding_dim})"
        )


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


def embed_aligned_faces(
    encoder: nn.Module, faces: Sequence[np.ndarray] | np.ndarray, batch_size: int = 32
) -> np.ndarray:
    """(N, 112, 112, 3) uint8 aligned faces -> (N, D) float32 encoder embeddings, in batches.

    `encoder` maps (B, 3, 112, 112) in [-1, 1] to (B, D) (an ArcFaceEncoder gives unit vectors).
    """
    device, dtype = module_device_dtype(encoder)
    rows = [np.zeros((0, getattr(encoder, "embedding_dim", 512)), dtype=np.float32)]
    with torch.inference_mode():
        for start in range(0, len(faces), batch_size):
            batch = images_to_arcface_input(np.stack(faces[start : start + batch_size]))
            rows.append(encoder(batch.to(device=device, dtype=dtype)).float().cpu().numpy())
    if len(rows) > 1:
        rows = rows[1:]
    return np.concatenate(rows).astype(np.float32)
