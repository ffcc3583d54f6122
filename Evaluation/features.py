"""Image features for diversity and fidelity: DINOv2 via transformers (the dgm-eval protocol).

dgm-eval (Stein et al. 2023) embeds each image with DINOv2 ViT-L/14 as: RGB, bicubic resize
to 224x224 (no aspect-preserving crop), scale to [0, 1], ImageNet mean/std, and takes the
final-LayerNorm CLS token. With transformers that is `Dinov2Model(...).pooler_output`
(= last_hidden_state[:, 0], already layer-normed). The weights come from a local folder or a
hub id the user gives (e.g. facebook/dinov2-large); nothing is fetched unless the id needs it.
`protocol="processor"` instead applies the checkpoint's own image processor unchanged
(DINOv2's: resize shorter side to 256, centre-crop 224).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from image_sets import STATUS_OK, rows_of_readable_images

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DGM_EVAL_IMAGE_SIZE = 224
PROTOCOLS = ("dgm-eval", "processor")
NO_FEATURE_MODEL = "none"  # --feature_model none: diversity and fidelity are skipped
FEATURE_MODEL_FIX = (
    "pass --feature_model DIR (a DINOv2 folder saved with save_pretrained) or --feature_model "
    f"{NO_FEATURE_MODEL} to skip diversity and fidelity"
)


def no_feature_model(name: str | Path | None) -> bool:
    """Whether --feature_model turns diversity and fidelity off (not given, or 'none')."""
    return name is None or str(name).strip().lower() in ("", NO_FEATURE_MODEL)


def check_feature_model(name: str | Path | None) -> None:
    """FileNotFoundError, before any image is read, when the feature model cannot be loaded
    offline: a local folder without config.json, a path that does not exist, or (with
    HF_HUB_OFFLINE=1) a hub id that is not in the cache, the check the base model gets
    (runs.check_hub_cache). Otherwise the evaluation fails only after training and
    generation, the first stage that loads it."""
    import runs

    if no_feature_model(name):
        return
    path = Path(str(name)).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"feature model folder {path} has no config.json; {FEATURE_MODEL_FIX}"
            )
        return
    if path.exists() or runs.looks_like_path(str(name)):
        raise FileNotFoundError(f"feature model {path} is not a folder; {FEATURE_MODEL_FIX}")
    runs.check_hub_cache(str(name), "feature model", "config.json", FEATURE_MODEL_FIX)


def _weights_fingerprint(model) -> str:
    """sha256 prefix over all parameter bytes: cached features follow the weights, not the path."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:12]


class FeatureExtractor:
    """Frozen image encoder: list of RGB PIL images -> (N, D) float32 CLS features."""

    def __init__(
        self,
        model_name_or_path: str | Path,
        device: str = "cpu",
        protocol: str = "dgm-eval",
        image_size: int = DGM_EVAL_IMAGE_SIZE,
    ):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown feature protocol {protocol!r}; options: {list(PROTOCOLS)}")
        from transformers import AutoImageProcessor, AutoModel

        source = str(Path(model_name_or_path).expanduser())
        if not Path(source).exists():
            source = str(model_name_or_path)  # a hub id
        try:
            # PIL backend: the same resampling as dgm-eval's PIL-based transforms, no torchvision.
            self.processor = AutoImageProcessor.from_pretrained(source, backend="pil")
            self.model = AutoModel.from_pretrained(source).eval()
        except OSError as error:
            raise FileNotFoundError(
                f"cannot load feature model {model_name_or_path!r}: give a local folder saved "
                "with save_pretrained (config.json, weights, preprocessor_config.json) or a hub "
                f"id such as facebook/dinov2-large with network access ({error})"
            ) from error
        self.model.requires_grad_(False)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(model_name_or_path)).name)
        preprocessing = f"dgm-eval{image_size}" if protocol == "dgm-eval" else protocol
        self.name = f"{stem}-{_weights_fingerprint(self.model)}-{preprocessing}"
        self.model.to(device)
        self.device = device
        self.protocol = protocol
        self.image_size = image_size
        self.feature_dim = int(self.model.config.hidden_size)

    def preprocess(self, images: Sequence) -> object:
        """RGB PIL images -> (N, 3, S, S) float pixel tensor as the protocol prescribes."""
        if self.protocol == "processor":
            return self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        from transformers.image_utils import PILImageResampling

        return self.processor(
            images=list(images),
            do_resize=True,
            size={"height": self.image_size, "width": self.image_size},
            resample=PILImageResampling.BICUBIC,
            do_center_crop=False,
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD),
            return_tensors="pt",
        )["pixel_values"]

    def embed(self, images: Sequence) -> np.ndarray:
        """RGB PIL images -> (N, D) float32 CLS features (final LayerNorm applied)."""
        import torch

        pixels = self.preprocess(images).to(self.device)  # (N, 3, S, S)
        with torch.inference_mode():
            outputs = self.model(pixel_values=pixels)
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is None:
            pooled = outputs.last_hidden_state[:, 0]
        return pooled.float().cpu().numpy()


def extract_image_features(
    extractor: FeatureExtractor, paths: Sequence[Path]
) -> tuple[np.ndarray, np.ndarray]:
    """Files -> (N, D) features (zero rows for unreadable files) and (N,) status."""
    return rows_of_readable_images(
        paths, extractor.feature_dim, lambda images: (extractor.embed(images), STATUS_OK)
    )
