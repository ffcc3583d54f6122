"""CR-FIQA face image quality (Boutros, Fang, Klemt, Fu, Damer, CVPR 2023, arXiv 2112.06592).

CR-FIQA trains an IResNet face recogniser whose 512-d feature also feeds a linear quality head
`qs`; the head regresses each training sample's relative classifiability, the ratio of its
cosine similarity to its own class centre (CCS) to that of the nearest other class centre
(NNCCS) (Smooth-L1, beta 0.5; `ccs / nnccs` in the official `train_cr_fiqa.py`). At test time
that predicted ratio is the quality score: higher = more useful for recognition.

Official model (github.com/fdbtrs/CR-FIQA, `backbones/iresnet.py`, `evaluation/QualityModel.py`),
which `CRFIQANet` reproduces key for key:
- arcface_torch's IResNet (same keys as `arcface.IResNet`, no SE blocks) plus `qs = Linear(512,
  1)` on the BatchNorm1d `features` output: checkpoint keys = arcface_torch keys + `qs.weight`
  (1, 512), `qs.bias` (1,). forward returns (embedding, qs); the score is `qs[:, 0]` as is (no
  sigmoid; `getQualityScore.py` writes `quality[i][0]`).
- CR-FIQA(S) = iresnet50 trained on CASIA-WebFace, file `32572backbone.pth`; CR-FIQA(L) =
  iresnet100 trained on MS1MV2, file `181952backbone.pth` (a plain `state_dict()`, no wrapper).
- Input: a 5-point aligned 112x112 crop (their alignment warps to insightface's
  `arcface_dst`, the template `faces.align_face` uses), scaled (x / 255 - 0.5) / 0.5, i.e.
  `arcface.images_to_arcface_input`. CR-FIQA's own scripts read BGR files whose channels were
  swapped on export, so the network sees RGB, as in training (mxnet decode + ToTensor).

Settings (QUALITY_SETTINGS, --quality_setting): "paper" = what ID-Booth scored: CR-FIQA(S)
(iresnet50, 32572backbone.pth) fed BGR (its getQualityScore_FR_ID-Booth_12-2024.py reads
PIL-saved RGB crops with cv2.imread and never converts; swapping channels changes the scores
completely); "crfiqa-rgb" = CR-FIQA's own protocol: RGB, either released model.

Weights are not shipped and never downloaded here. The official README links them as Google
Drive folders: CR-FIQA(L) https://drive.google.com/drive/folders/1siy_3eQSBuIV6U6_9wgGtbZG2GMgVLMy
and CR-FIQA(S) https://drive.google.com/drive/folders/13bE4LP303XA_IzL1YOgG5eN0c8efHU9h. The
README licenses the project under CC BY-NC 4.0 (Attribution-NonCommercial, Fraunhofer IGD) and
asks that the training sets (MS1MV2, CASIA-WebFace) be used strictly under their licences, so
the released models are for non-commercial research use.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from arcface import (
    IRESNET_LAYERS,
    IResNet,
    check_strict_keys,
    images_to_arcface_input,
    infer_iresnet_depth,
    read_state_dict,
    weights_name,
)
from faces import (
    DEFAULT_FACE_MODELS_ROOT,
    FaceDetector,
    build_face_detector,
)
from image_sets import STATUS_OK, aligned_face, rows_of_face_model

# Depths the official backbones/iresnet.py defines (iresnet18/34/50/100); released: r50, r100.
CRFIQA_DEPTHS = ("r18", "r34", "r50", "r100")
QUALITY_HEAD_KEYS = ("qs.weight", "qs.bias")
_REQUIRED_KEYS = ("conv1.weight", "fc.weight", "features.weight", *QUALITY_HEAD_KEYS)
WEIGHTS_HINT = (
    "the released CR-FIQA(S) 32572backbone.pth / CR-FIQA(L) 181952backbone.pth, linked from "
    "https://github.com/fdbtrs/CR-FIQA#pretrained-model"
)


@dataclass(frozen=True)
class QualitySetting:
    """A scoring protocol: the CR-FIQA model it expects and the channel order it feeds."""

    depth: str | None  # the IResNet depth the weights must have; None: any released one
    channel_order: str  # "BGR" or "RGB": what the network is fed
    description: str


QUALITY_SETTINGS = {
    "paper": QualitySetting(
        "r50",
        "BGR",
        "the paper's: CR-FIQA(S) (iresnet50, 32572backbone.pth) fed BGR, as ID-Booth's "
        "getQualityScore script (cv2.imread of RGB crops, never converted)",
    ),
    "crfiqa-rgb": QualitySetting(
        None,
        "RGB",
        "CR-FIQA's own protocol: RGB, as the model was trained (not the paper's setting)",
    ),
}


def quality_setting(name: str) -> QualitySetting:
    """QUALITY_SETTINGS[name]; ValueError listing the options."""
    if name not in QUALITY_SETTINGS:
        raise ValueError(f"unknown quality setting {name!r}; options: {list(QUALITY_SETTINGS)}")
    return QUALITY_SETTINGS[name]


class CRFIQANet(IResNet):
    """arcface.IResNet + CR-FIQA's quality head `qs` (Linear(num_features, 1)) on `features`."""

    def __init__(self, layers: Sequence[int], num_features: int = 512):
        super().__init__(layers, num_features=num_features)
        self.qs = nn.Linear(num_features, 1)  # registered last: key order as the official model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, 112, 112) RGB in [-1, 1] -> (B, 512) raw embedding, (B, 1) quality score."""
        embedding = super().forward(x)  # BatchNorm1d output, not normalised (as the official)
        return embedding, self.qs(embedding)


def build_crfiqa(name: str = "r50", num_features: int = 512) -> CRFIQANet:
    """CR-FIQA network by depth (r18/r34/r50/r100), random arcface_torch initialisation."""
    if name not in CRFIQA_DEPTHS:
        raise ValueError(f"unknown CR-FIQA depth {name!r}; options: {list(CRFIQA_DEPTHS)}")
    return CRFIQANet(IRESNET_LAYERS[name], num_features=num_features)


def _check_required_keys(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """ValueError unless the IResNet stem and the quality head are present."""
    missing = [key for key in _REQUIRED_KEYS if key not in state_dict]
    if not missing:
        return
    plain_arcface = set(missing) == set(QUALITY_HEAD_KEYS)
    hint = (
        " (a plain ArcFace IResNet backbone without the quality head: CR-FIQA checkpoints "
        "add `qs` after `features`)"
        if plain_arcface
        else f" (first keys: {list(state_dict)[:5]})"
    )
    raise ValueError(
        f"{source} is not a CR-FIQA checkpoint: missing {missing}{hint}; expected {WEIGHTS_HINT}"
    )


def crfiqa_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], source: str = "state dict"
) -> CRFIQANet:
    """Strictly load an official CR-FIQA state dict (depth inferred) into CRFIQANet, eval mode."""
    _check_required_keys(state_dict, source)
    name = infer_iresnet_depth(state_dict)
    if name not in CRFIQA_DEPTHS:
        raise ValueError(f"{source}: CR-FIQA defines depths {list(CRFIQA_DEPTHS)}, not {name}")
    broken = [
        key
        for key, value in state_dict.items()
        if value.is_floating_point() and not bool(value.isfinite().all())
    ]
    if broken:
        raise ValueError(
            f"{source} holds NaN/inf in {len(broken)} tensors (e.g. {broken[0]}): the weights "
            f"file is broken; download it again ({WEIGHTS_HINT})"
        )
    num_features = int(state_dict["fc.weight"].shape[0])
    with torch.device("meta"):  # shapes only: every tensor is overwritten below
        model = build_crfiqa(name, num_features)
    expected = model.state_dict()
    state = dict(state_dict)
    for key in expected:  # BatchNorm step counters: bookkeeping, never used in eval
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    check_strict_keys(state, expected, source, "a CR-FIQA")
    model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_crfiqa(path: str | Path, device: str | torch.device = "cpu") -> CRFIQANet:
    """Strictly load a CR-FIQA `*backbone.pth` (torch.load weights_only=True), eval mode."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"CR-FIQA weights not found: {path}; expected {WEIGHTS_HINT}")
    return crfiqa_from_state_dict(read_state_dict(path), source=str(path)).to(device).eval()


class CRFIQAScorer:
    """CR-FIQA quality of RGB images: detect + 5-point align (or take aligned crops) + score.

    With `detector=None` every image must already be an aligned 112x112 crop (the official
    evaluation input); otherwise the detector's largest face is aligned with `faces.align_face`,
    exactly as training and identity evaluation do. `name` keys result caches.
    """

    def __init__(
        self,
        model: CRFIQANet,
        detector: FaceDetector | None = None,
        batch_size: int = 32,
        weights: str = "crfiqa",
        channel_order: str = "RGB",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be RGB or BGR, got {channel_order!r}")
        self.model = model.eval()
        self.detector = detector
        self.batch_size = batch_size
        self.channel_order = channel_order
        weights = re.sub(r"^crfiqa[-_]?", "", weights, flags=re.IGNORECASE) or weights
        aligned = detector.name if detector is not None else "aligned"
        self.name = f"crfiqa-{weights}-{aligned}-{channel_order.lower()}"

    def score_aligned(self, faces: np.ndarray) -> np.ndarray:
        """(N, 112, 112, 3) uint8 RGB aligned crops -> (N,) float32 quality scores (the
        network fed `channel_order`)."""
        if len(faces) == 0:
            return np.zeros(0, dtype=np.float32)
        if self.channel_order == "BGR":
            faces = np.ascontiguousarray(np.asarray(faces)[..., ::-1])
        device = next(self.model.parameters()).device
        scores = []
        with torch.inference_mode():
            for start in range(0, len(faces), self.batch_size):
                batch = images_to_arcface_input(faces[start : start + self.batch_size])
                _, head = self.model(batch.to(device))  # (B, 1) quality head output
                scores.append(head[:, 0].float().cpu().numpy())
        return np.concatenate(scores)

    def score(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 RGB images -> (N,) float32 scores (NaN where no face), (N,) found."""
        crops = [
            aligned_face(np.asarray(image), self.detector, i, "CR-FIQA")
            for i, image in enumerate(images)
        ]
        found = np.array([crop is not None for crop in crops], dtype=bool)
        scores = np.full(len(crops), np.nan, dtype=np.float32)
        if found.any():
            scores[found] = self.score_aligned(np.stack([c for c in crops if c is not None]))
        return scores, found


def build_quality_scorer(
    weights: str | Path,
    face_detector: str | None = "auto",
    face_models_root: str | Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    setting: str = "paper",
) -> CRFIQAScorer:
    """Scorer from CR-FIQA weights, a detector name (build_face_detector; None = aligned) and
    a QUALITY_SETTINGS name; ValueError when the weights are not the setting's model."""
    protocol = quality_setting(setting)
    model = load_crfiqa(weights, device=device)
    depth = infer_iresnet_depth(model.state_dict())
    if protocol.depth is not None and depth != protocol.depth:
        raise ValueError(
            f"--quality_setting {setting} is {protocol.description}; {weights} is an {depth} "
            f"CR-FIQA: give 32572backbone.pth or use --quality_setting crfiqa-rgb"
        )
    detector = None
    if face_detector is not None:
        detector = build_face_detector(face_detector, face_models_root or DEFAULT_FACE_MODELS_ROOT)
    name = weights_name(weights)
    return CRFIQAScorer(model, detector, batch_size, name, protocol.channel_order)


def score_image_files(scorer: CRFIQAScorer, paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Files -> (N, 1) float32 quality rows (NaN unless STATUS_OK) and (N,) status codes.

    Shaped like face_embedding.embed_image_files, for image_sets.cached_rows.
    """

    rows, status = rows_of_face_model(paths, 1, scorer.score)
    rows[status != STATUS_OK] = np.nan  # unreadable files get 0 from rows_of_face_model
    return rows, status


def quality_summary(scores: np.ndarray, status: np.ndarray | None = None) -> dict[str, int | float]:
    """{n, mean, std (population, ddof 0), median} of (N,) or (N, 1) scores (STATUS_OK only)."""
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise ValueError(f"expected (N,) or (N, 1) quality scores, got shape {values.shape}")
    if status is not None:
        status = np.asarray(status)
        if status.shape != values.shape:
            raise ValueError(f"{values.shape[0]} scores but status of shape {status.shape}")
        values = values[status == STATUS_OK]
    if not np.isfinite(values).all():
        raise ValueError(
            "non-finite quality scores: pass the status codes so images without a face are left out"
        )
    if values.size == 0:
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "median": float("nan")}
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "median": float(np.median(values)),
    }
