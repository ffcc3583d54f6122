"""Random-weight Stable Diffusion pipelines and ArcFace checkpoints, built offline.

Tests, the demo and the benchmarks load these with the very code that loads the real
`stabilityai/stable-diffusion-2-1-base` (or SD 1.5, SD 2.1 768-v, SDXL base) and an insightface
`backbone.pth`. Two sizes of each architecture (RANDOM_MODEL_NAMES): "tiny" / "tiny-<base>" (a
few channels; 64 px images in a fraction of a second on a CPU) and "<base>" (the real shapes,
for GPU benchmarks; random weights, so only speed and memory mean anything). A tiny random
DINOv2 stands in for the evaluation's feature model, a random CR-FIQA for the quality model;
the demo's identities are real faces cut from a photo shipped in insightface's
wheel (`prepare_embedded_identities`).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TINY_TEXT_HIDDEN = 32


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


def write_byte_level_clip_tokenizer(folder: Path) -> None:
    """Write a minimal byte-level BPE vocab (no merges) that CLIPTokenizer reads."""
    folder.mkdir(parents=True, exist_ok=True)
    byte_symbols = list(_bytes_to_unicode().values())
    tokens = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")


SD21_TEXT_HIDDEN = 1024
# Random models by name: "<shape>" for the real shapes of a base, "tiny" / "tiny-<shape>" for
# a few channels of the same architecture (64 px). "tiny" and "sd21" are the paper's SD 2.1-base.
RANDOM_MODEL_NAMES = (
    "tiny",
    "tiny-sd15",
    "tiny-sd21-v",
    "tiny-sdxl",
    "sd21",
    "sd15",
    "sd21-v",
    "sdxl",
)


def _split_name(name: str) -> tuple[str, bool]:
    """'tiny-sdxl' -> ('sdxl', True); 'tiny' -> ('sd21', True); 'sd15' -> ('sd15', False)."""
    if name not in RANDOM_MODEL_NAMES:
        raise ValueError(f"unknown size {name!r}; choose one of: {', '.join(RANDOM_MODEL_NAMES)}")
    if name == "tiny":
        return "sd21", True
    tiny = name.startswith("tiny-")
    return name.removeprefix("tiny-"), tiny


def _unet_config(base: str, tiny: bool) -> dict:
    """UNet2DConditionModel config of `base` ("sd15", "sd21", "sd21-v", "sdxl")."""
    if base == "sdxl":
        return _sdxl_unet_config(tiny)
    linear = base != "sd15"  # SD 1.x transformer blocks project with 1x1 convolutions
    if tiny:
        return dict(
            sample_size=8,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TINY_TEXT_HIDDEN,
            attention_head_dim=(2, 4),
            use_linear_projection=linear,
            norm_num_groups=4,
        )
    return dict(  # stabilityai/stable-diffusion-2-1(-base), runwayml/stable-diffusion-v1-5
        sample_size=96 if base == "sd21-v" else 64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768 if base == "sd15" else SD21_TEXT_HIDDEN,
        attention_head_dim=8 if base == "sd15" else (5, 10, 20, 20),
        use_linear_projection=linear,
    )


def _sdxl_unet_config(tiny: bool) -> dict:
    """SDXL's UNet: text_time added conditioning (pooled text + 6 size/crop ids, each embedded
    in addition_time_embed_dim), cross-attention on both text encoders' hidden states."""
    if tiny:  # diffusers' own SDXL pipeline tests, with channels a multiple of 4
        return dict(
            sample_size=8,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=2 * TINY_TEXT_HIDDEN,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + TINY_TEXT_HIDDEN,
            norm_num_groups=4,
        )
    return dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def _vae_config(base: str, tiny: bool) -> dict:
    config = dict(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4) if tiny else (128, 256, 512, 512),
        latent_channels=4,
        layers_per_block=1 if tiny else 2,
        norm_num_groups=2 if tiny else 32,
        sample_size=64 if tiny else 512,
    )
    if base == "sdxl":  # SDXL's VAE overflows in fp16: its config asks for fp32 decoding
        config.update(scaling_factor=0.13025, force_upcast=True, sample_size=64 if tiny else 1024)
    return config


# Text towers: CLIP ViT-L/14 (SD 1.x, SDXL's first encoder), OpenCLIP ViT-H/14 (SD 2.x) and
# OpenCLIP ViT-bigG/14 (SDXL's second encoder, with projection).
_TEXT_TOWERS = {
    "vit-l": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        projection_dim=768,
        hidden_act="quick_gelu",
    ),
    "vit-h": dict(
        hidden_size=SD21_TEXT_HIDDEN,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        projection_dim=512,
        hidden_act="gelu",
    ),
    "vit-bigg": dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        projection_dim=1280,
        hidden_act="gelu",
    ),
}


def _text_config(tower: str, tiny: bool, tokenizer) -> dict:
    special_ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=77,
    )
    if tiny:
        return dict(
            vocab_size=len(tokenizer),
            hidden_size=TINY_TEXT_HIDDEN,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=TINY_TEXT_HIDDEN,
            hidden_act=_TEXT_TOWERS[tower]["hidden_act"],
            **special_ids,
        )
    return dict(vocab_size=49408, **_TEXT_TOWERS[tower], **special_ids)


def _scheduler(base: str):
    """The base's scheduler config: SD's DDPM betas (scaled_linear 0.00085..0.012), epsilon or
    v-prediction (SD 2.1 768 px); SDXL ships it as an EulerDiscreteScheduler."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    common = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
    )
    if base == "sdxl":
        return EulerDiscreteScheduler(
            **common, prediction_type="epsilon", timestep_spacing="leading"
        )
    prediction_type = "v_prediction" if base == "sd21-v" else "epsilon"
    return DDPMScheduler(**common, prediction_type=prediction_type, clip_sample=False)


def build_random_sd_pipeline(size: str = "tiny", seed: int = 0, workdir: str | Path | None = None):
    """A StableDiffusionPipeline (StableDiffusionXLPipeline for the SDXL names) with random
    weights; `size` is one of RANDOM_MODEL_NAMES."""
    import tempfile

    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    base, tiny = _split_name(size)
    torch.manual_seed(seed)
    tokenizer_dir = Path(workdir or tempfile.mkdtemp()) / "_tokenizer_src"
    write_byte_level_clip_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **_unet_config(base, tiny))
    vae = AutoencoderKL(in_channels=3, out_channels=3, **_vae_config(base, tiny))
    if base == "sdxl":
        return StableDiffusionXLPipeline(
            unet=unet,
            vae=vae,
            text_encoder=CLIPTextModel(CLIPTextConfig(**_text_config("vit-l", tiny, tokenizer))),
            text_encoder_2=CLIPTextModelWithProjection(
                CLIPTextConfig(**_text_config("vit-bigg", tiny, tokenizer))
            ),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            scheduler=_scheduler(base),
            add_watermarker=False,
        )
    tower = "vit-l" if base == "sd15" else "vit-h"
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**_text_config(tower, tiny, tokenizer))),
        tokenizer=tokenizer,
        scheduler=_scheduler(base),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sd(folder: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Save a random pipeline (`size`: one of RANDOM_MODEL_NAMES) under `folder`; its path."""
    folder = Path(folder)
    pipeline = build_random_sd_pipeline(size, seed, workdir=folder)
    pipeline.save_pretrained(folder)
    # transformers 5 saves only tokenizer.json; keep the slow-tokenizer files too.
    for tokenizer in ("tokenizer", "tokenizer_2"):
        if (folder / tokenizer).is_dir():
            for name in ("vocab.json", "merges.txt"):
                source = folder / "_tokenizer_src" / name
                (folder / tokenizer / name).write_bytes(source.read_bytes())
    return folder


def build_tiny_dinov2(folder: str | Path, image_size: int = 56, seed: int = 0) -> Path:
    """Random 2-layer Dinov2Model (hidden 32) + PIL image processor saved with save_pretrained."""
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=14,
    )
    Dinov2Model(config).eval().save_pretrained(folder)
    BitImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return Path(folder)


def calibrate_batchnorm(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> torch.nn.Module:
    """Set every BatchNorm's running statistics to the cumulative average over train-mode
    passes of `inputs`, then eval. A random IResNet with arcface_torch's init (unit running
    variances) grows its activations by ~2.4x per conv and overflows at depth 100; measured
    statistics keep the outputs finite at any depth."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative moving average
    model.train()
    with torch.no_grad():
        for batch in inputs:
            model(batch)
    return model.eval()


def write_random_lora(
    folder: str | Path,
    unet: torch.nn.Module,
    *,
    rank: int = 4,
    alpha: float = 4,
    target_modules: Sequence[str] = ("to_k", "to_q", "to_v", "to_out.0"),
    seed: int = 0,
    std: float = 0.3,
    base_model: dict | None = None,
    **lora_options: object,
) -> Path:
    """A LoRA file as train_ID-Booth.py writes it (diffusers format, adapter metadata, the
    `base_model` record when given) for a copy of `unet`, every LoRA matrix N(0, std^2) from
    `seed`: peft's init leaves B = 0, which would hide a LoRA that is applied wrongly or not at
    all. Returns the file's path."""
    import copy

    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from lora import write_lora_file

    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(target_modules), **lora_options
    )
    unet = copy.deepcopy(unet).requires_grad_(False)
    unet.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return write_lora_file(Path(folder), state, config.to_dict(), base_model)


# ============================================================================ the demo's inputs
# Faces of insightface's shipped t1.jpg (six people), left to right; the first two (both women)
# become identities, the other four are prior (class) images.
NUM_DEMO_IDENTITIES = 2
CROP_VARIANTS = ((2.4, 0.0, 0.0), (2.8, 0.08, 0.0), (2.6, -0.08, 0.05), (3.0, 0.0, -0.05))


def prepare_embedded_models(models_dir: Path) -> dict[str, Path]:
    """Random tiny SD pipeline, IResNet-18 checkpoint and DINOv2, built once."""
    from arcface import build_iresnet
    from fileio import atomic_folder, atomic_path, remove_stale_temps

    paths = {
        "sd": models_dir / "tiny-sd",
        "arcface": models_dir / "arcface_r18_random.pth",
        "dinov2": models_dir / "tiny-dinov2",
        "crfiqa": models_dir / "crfiqa_r50_random.pth",
    }
    # Each model is written to a temp name and renamed when complete, so a demo killed during
    # set-up leaves no half-written model that a rerun would trust; the temps such a kill left
    # (tens of MB each) are deleted here, on the next run.
    remove_stale_temps(models_dir, {path.name for path in paths.values()})
    if not paths["sd"].is_dir():
        with atomic_folder(paths["sd"]) as temp:
            build_tiny_sd(temp)
    if not paths["arcface"].is_file():
        torch.manual_seed(0)
        with atomic_path(paths["arcface"]) as temp:
            torch.save(build_iresnet("r18").state_dict(), temp)
    if not paths["dinov2"].is_dir():
        with atomic_folder(paths["dinov2"]) as temp:
            build_tiny_dinov2(temp)
    if not paths["crfiqa"].is_file():
        with atomic_path(paths["crfiqa"]) as temp:
            torch.save(random_crfiqa().state_dict(), temp)
    return paths


def random_crfiqa():
    """A random CR-FIQA(S) IResNet-50 (the paper's model, so the paper's quality setting runs)
    with BatchNorm statistics of random faces (finite scores)."""
    sys.path.append(str(Path(__file__).resolve().parent / "Evaluation"))
    from quality import build_crfiqa

    torch.manual_seed(0)
    faces = torch.rand((8, 3, 112, 112), generator=torch.Generator().manual_seed(1)) * 2 - 1
    return calibrate_batchnorm(build_crfiqa("r50"), [faces])


def crop_face(
    photo: Image.Image, landmarks: np.ndarray, scale: float, dx: float, dy: float
) -> Image.Image:
    """Square crop around the 5 landmarks, `scale` times the eye-mouth extent, shifted."""
    centre = landmarks.mean(axis=0)
    extent = float(np.ptp(landmarks, axis=0).max()) * scale
    cx, cy = centre[0] + dx * extent, centre[1] + dy * extent
    box = (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2)
    return photo.crop(tuple(int(round(v)) for v in box)).resize((256, 256), Image.BICUBIC)


def prepare_embedded_identities(data_dir: Path) -> tuple[Path, Path, Path]:
    """Identity folders and a prior folder cut from insightface's shipped group photo."""
    import insightface

    from faces import DlibFaceDetector
    from fileio import atomic_write_json

    identities_root, class_dir = data_dir / "identities", data_dir / "class"
    attributes_path = data_dir / "identity_attributes.json"
    if attributes_path.exists():
        return identities_root, class_dir, attributes_path
    images_dir = Path(insightface.__file__).parent / "data" / "images"
    photo = Image.open(images_dir / "t1.jpg").convert("RGB")
    upsampled = photo.resize((photo.width * 2, photo.height * 2), Image.BICUBIC)
    faces = DlibFaceDetector().detect_all_landmarks(np.asarray(upsampled))
    faces = sorted(faces, key=lambda points: points[:, 0].mean())
    if len(faces) < NUM_DEMO_IDENTITIES + 1:
        raise RuntimeError(
            f"expected six faces in {images_dir / 't1.jpg'}, dlib found {len(faces)}"
        )
    for index, landmarks in enumerate(faces):
        is_identity = index < NUM_DEMO_IDENTITIES
        folder = identities_root / f"person_{index}" if is_identity else class_dir
        folder.mkdir(parents=True, exist_ok=True)
        variants = CROP_VARIANTS if is_identity else CROP_VARIANTS[:2]
        for variant, (scale, dx, dy) in enumerate(variants):
            crop_face(upsampled, landmarks, scale, dx, dy).save(
                folder / f"person_{index}_{variant}.png"
            )
    attributes = {f"person_{index}": {"gender": "female"} for index in range(NUM_DEMO_IDENTITIES)}
    atomic_write_json(attributes_path, attributes)  # written last: the marker of a finished set-up
    return identities_root, class_dir, attributes_path


DEMO_PAIRS_PER_KIND = 6  # genuine and impostor pairs of demo_pairs.bin (10 folds need 10)


def prepare_demo_benchmark(data_dir: Path) -> Path:
    """A folder with demo_pairs.bin: the demo's real faces (six people, 2-4 crops each) aligned
    to 112x112; 6 same-person pairs of crops (genuine) and 6 cross-person pairs (impostor)."""
    from itertools import combinations

    import runs
    from datasets import list_images
    from faces import DlibFaceDetector, align_face

    sys.path.append(str(Path(__file__).resolve().parent / "Evaluation"))
    from verify import write_bin

    folder = data_dir / "benchmarks"
    if (folder / "demo_pairs.bin").is_file():
        return folder
    detector = DlibFaceDetector()
    by_person: dict[str, list[bytes]] = {}
    folders = [*runs.identity_folders(data_dir / "identities"), data_dir / "class"]
    for path in [image for folder in folders for image in list_images(folder)]:
        image = np.asarray(Image.open(path).convert("RGB"))
        landmarks = detector.detect_landmarks(image)
        if landmarks is not None:
            encoded = io.BytesIO()
            Image.fromarray(align_face(image, landmarks, 112)).save(encoded, format="PNG")
            by_person.setdefault(path.stem.rsplit("_", 1)[0], []).append(encoded.getvalue())
    people = sorted(by_person)
    genuine = [pair for p in people for pair in combinations(by_person[p], 2)]
    genuine = [genuine[i] for i in np.linspace(0, len(genuine) - 1, DEMO_PAIRS_PER_KIND, dtype=int)]
    impostor = [(by_person[a][-1], by_person[b][0]) for a, b in combinations(people, 2)]
    impostor = impostor[:DEMO_PAIRS_PER_KIND]
    pairs = genuine + impostor
    if len(set(genuine)) < DEMO_PAIRS_PER_KIND or len(impostor) < DEMO_PAIRS_PER_KIND:
        raise RuntimeError(
            f"too few faces found in the demo photos for {DEMO_PAIRS_PER_KIND} pairs"
        )
    write_bin(
        folder / "demo_pairs.bin",
        [image for pair in pairs for image in pair],
        [True] * len(genuine) + [False] * len(impostor),
    )
    return folder


# ============================================================================ command line


def build_parser() -> argparse.ArgumentParser:
    """`python random_models.py --size tiny-sdxl OUT_DIR`: a random pipeline folder."""
    parser = argparse.ArgumentParser(
        description="Save a random-weight Stable Diffusion pipeline folder (save_pretrained "
        "layout) that every script loads as --pretrained_model_name_or_path, offline.",
        allow_abbrev=False,
    )
    parser.add_argument("out_dir", type=Path, help="Folder to create (must not hold files).")
    parser.add_argument(
        "--size",
        default="tiny",
        choices=RANDOM_MODEL_NAMES,
        help="tiny / tiny-<base>: a few channels, 64 px, seconds on a CPU; <base>: the real "
        "shapes (GBs, random weights: for speed and memory only). 'tiny' and 'sd21' are SD "
        "2.1-base. Default: tiny.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Weights seed (default 0).")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    """Build the folder; refuse a non-empty one (a random model must never replace files)."""
    args = build_parser().parse_args(argv)
    if args.out_dir.exists() and any(args.out_dir.iterdir()):
        raise SystemExit(f"random_models.py: error: {args.out_dir} is not empty; pick a new folder")
    folder = build_tiny_sd(args.out_dir, seed=args.seed, size=args.size)
    print(f"random {args.size} pipeline saved in {folder}")
    return folder


if __name__ == "__main__":
    main()
