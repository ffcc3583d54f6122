"""Face verification on insightface `.bin` pair files with the 10-fold protocol.

A `.bin` (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW as shipped with insightface's training
sets) is a pickle of `(images, issame)`: `images` a list of 2N encoded images (JPEG/PNG
bytes; pair i is images[2i], images[2i+1]), `issame` N booleans. The original files were
written by Python 2, so their byte strings are read with `encoding="bytes"`.

Pickles can run code, so the file is read with a restricted unpickler: containers and
scalars that need no import (list, tuple, bytes, bytearray, bool, int) always load; the only
importable names it resolves are `builtins.bytes` and `_codecs.encode` with the latin1
codec (how Python 3 writes bytes at pickle protocol <= 2), and numpy's array/scalar
reconstruction: `_reconstruct` (protocol <= 4), `_frombuffer` (protocol 5, how numpy >= 1.16
pickles contiguous arrays: the payload is an in-band PickleBuffer, i.e. a BYTEARRAY8), `scalar`
and `dtype`, each wrapped to refuse object dtypes. Anything else raises `UnsafeBinError`
before it is called. So `issame` may be a numpy bool array, and an image may be what
insightface's packing tool (`build_eval_pack.py`) stores: the uint8 vector `cv2.imencode`
returns, (L,) or (L, 1), pickled at protocol 5. A protocol-5 stream that refers to
out-of-band buffers (NEXT_BUFFER) cannot be read from a file alone and is a clear error.
Loaded values are then checked: images must be encoded bytes, encoded uint8 vectors or
decoded uint8 HxWx3 arrays; issame bools.

Protocol (insightface recognition/arcface_torch/eval/verification.py): each image and its
horizontal flip go through the backbone, the two raw embeddings are summed and
L2-normalised; the squared L2 distance of each pair is thresholded at 0, 0.01, ..., 3.99;
pairs are split into 10 contiguous folds (KFold without shuffling); for each fold the
threshold with the best accuracy on the other 9 folds (first one on ties) is applied to
the held-out fold; the result is the mean +- std of the 10 held-out accuracies.
"""

from __future__ import annotations

import argparse
import io
import logging
import pickle
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # shared modules at the repo root

import runs  # noqa: E402
from fileio import atomic_path, atomic_write_json  # noqa: E402

logger = logging.getLogger("verify")

IMAGE_SIZE = 112
DEFAULT_THRESHOLDS = np.arange(0, 4, 0.01)  # squared L2 distance between unit vectors: [0, 4]
BIN_NAMES = ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw")


class UnsafeBinError(ValueError):
    """A `.bin` pickle asked for something other than the plain data a pair file holds."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Python 3 pickles bytes at protocol <= 2 as _codecs.encode(text, 'latin1'); only that."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafeBinError(f"_codecs.encode with {encoding!r} is not how bytes are pickled")
    return text.encode("latin1")


def _refuse_object_dtype(dtype: np.dtype) -> np.dtype:
    """An object dtype would make numpy unpickle arbitrary Python objects into the array."""
    if dtype.hasobject:
        raise UnsafeBinError(f"refusing to load an array of dtype {dtype}: object arrays")
    return dtype


def _numpy_allowed_globals() -> dict[tuple[str, str], object]:
    """numpy's ndarray/scalar reconstruction names, under both numpy 1 and 2 module paths,
    each refusing object dtypes before numpy sees the payload."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric

    def plain_dtype(spec: object, align: bool = False, copy: bool = False) -> np.dtype:
        return _refuse_object_dtype(np.dtype(spec, align, copy))

    def from_buffer(buffer: object, dtype: np.dtype, shape: tuple, order: str) -> np.ndarray:
        # protocol 5: numeric._frombuffer(PickleBuffer, dtype, shape, order); in a file the
        # buffer arrives in-band as a bytearray (out-of-band ones never reach this point)
        if not isinstance(buffer, bytes | bytearray | pickle.PickleBuffer | memoryview):
            raise UnsafeBinError(f"refusing _frombuffer of a {type(buffer).__name__}")
        return numeric._frombuffer(buffer, _refuse_object_dtype(np.dtype(dtype)), shape, order)

    def reconstruct(subtype: type, shape: tuple, typecode: bytes) -> np.ndarray:
        if subtype is not np.ndarray:
            raise UnsafeBinError(f"refusing to reconstruct a {subtype!r}")
        return multiarray._reconstruct(subtype, shape, typecode)

    def scalar(dtype: np.dtype, *state: object) -> object:
        return multiarray.scalar(_refuse_object_dtype(np.dtype(dtype)), *state)

    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): plain_dtype,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = from_buffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a verification pair file can need."""

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        self.allowed = {
            ("builtins", "bytes"): bytes,
            ("__builtin__", "bytes"): bytes,
            ("_codecs", "encode"): _latin1_encode,
            **_numpy_allowed_globals(),
        }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.allowed:
            raise UnsafeBinError(
                f"refusing to load {module}.{name}: a verification .bin holds only image bytes "
                "and booleans; this file may carry code (do not use it)"
            )
        return self.allowed[(module, name)]


def _decode_image(item: object, index: int, path: Path) -> np.ndarray:
    """Encoded bytes, an encoded uint8 vector (cv2.imencode's (L,) or (L, 1)) or a decoded
    (H, W, 3) uint8 array -> (112, 112, 3) uint8 RGB."""
    if isinstance(item, np.ndarray) and _is_encoded_vector(item):
        item = item.tobytes()
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
            raise ValueError(
                f"{path}: image {index} is an array {item.dtype} {item.shape}, expected "
                "(H, W, 3) uint8 pixels or an encoded uint8 vector"
            )
        image = Image.fromarray(item)
    elif isinstance(item, bytes | bytearray):
        try:
            image = Image.open(io.BytesIO(item))
            image = image.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{path}: image {index} cannot be decoded ({exc})") from exc
    else:
        raise ValueError(f"{path}: image {index} is a {type(item).__name__}, expected bytes")
    return np.asarray(_resize_short_center_crop(image, IMAGE_SIZE), dtype=np.uint8)


def _is_encoded_vector(array: np.ndarray) -> bool:
    """cv2.imencode returns the file bytes as uint8 (L,) (OpenCV >= 5) or (L, 1) (before)."""
    return array.dtype == np.uint8 and (
        array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1)
    )


def _resize_short_center_crop(image: Image.Image, size: int) -> Image.Image:
    """insightface resizes the shorter side to 112 when a pair image is not 112 wide."""
    if image.size == (size, size):
        return image
    width, height = image.size
    ratio = size / min(width, height)
    resized = image.resize((round(width * ratio), round(height * ratio)), Image.BILINEAR)
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def _as_issame(raw: object, path: Path) -> np.ndarray:
    """issame list / numpy bool array -> (N,) bool, rejecting anything not boolean."""
    if isinstance(raw, np.ndarray):
        if raw.dtype != np.bool_ or raw.ndim != 1:
            raise ValueError(f"{path}: issame is an array {raw.dtype} {raw.shape}, expected bool")
        return raw.copy()
    if not isinstance(raw, list | tuple) or not all(
        isinstance(v, bool | np.bool_) or (type(v) is int and v in (0, 1)) for v in raw
    ):
        raise ValueError(f"{path}: issame must be a list of booleans")
    return np.asarray(raw, dtype=bool)


@dataclass
class PairSet:
    """A decoded verification set: images (2N, 112, 112, 3) uint8 RGB, issame (N,) bool."""

    name: str
    images: np.ndarray
    issame: np.ndarray


def load_bin(path: str | Path, name: str | None = None) -> PairSet:
    """Read an insightface `.bin` safely (see module doc) and decode its images."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification file {path} does not exist (pass --bin FILE.bin)")
    with path.open("rb") as handle:
        try:
            payload = RestrictedUnpickler(handle, encoding="bytes").load()
        except UnsafeBinError:
            raise
        except Exception as exc:  # truncated or not a pickle at all
            raise ValueError(f"{path} is not a readable verification .bin ({exc})") from exc
    if not isinstance(payload, tuple | list) or len(payload) != 2:
        raise ValueError(f"{path}: expected a pickled (images, issame) pair")
    raw_images, raw_issame = payload
    issame = _as_issame(raw_issame, path)
    if not isinstance(raw_images, list | tuple) or len(raw_images) != 2 * len(issame):
        count = len(raw_images) if isinstance(raw_images, list | tuple) else "?"
        raise ValueError(f"{path}: {count} images for {len(issame)} pairs; need exactly 2 per pair")
    if len(issame) == 0:
        raise ValueError(f"{path} holds no pairs")
    images = np.stack([_decode_image(item, i, path) for i, item in enumerate(raw_images)])
    return PairSet(name=name or path.stem, images=images, issame=issame)


def write_bin(path: str | Path, encoded_images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write a `.bin` as insightface lays it out: pickle of (list of bytes, list of bool)."""
    payload = ([bytes(b) for b in encoded_images], [bool(v) for v in issame])
    with atomic_path(path) as temp, temp.open("wb") as handle:
        pickle.dump(payload, handle, protocol=pickle.HIGHEST_PROTOCOL)


@torch.no_grad()
def embed_with_flip(
    backbone: torch.nn.Module, images: np.ndarray, batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """e = normalize(f(x) + f(flip(x))): (N, 112, 112, 3) uint8 -> (N, D) float64 unit rows."""
    from arcface import images_to_arcface_input

    was_training = backbone.training
    backbone.eval()
    sums = []
    try:
        for start in range(0, len(images), batch_size):
            batch = images_to_arcface_input(images[start : start + batch_size]).to(device)
            both = backbone(batch).float() + backbone(torch.flip(batch, dims=[3])).float()
            sums.append(both.cpu().double())
    finally:
        backbone.train(was_training)
    return F.normalize(torch.cat(sums), dim=1).numpy()


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """d_i = ||e_{2i} - e_{2i+1}||^2: (2N, D) -> (N,)."""
    return np.sum(np.square(embeddings[0::2] - embeddings[1::2]), axis=1)


def contiguous_folds(num_pairs: int, num_folds: int = 10) -> list[np.ndarray]:
    """Indices of KFold(n_splits, shuffle=False) test folds: first num_pairs % k get one extra."""
    if num_pairs < num_folds:
        raise ValueError(f"{num_pairs} pairs cannot be split into {num_folds} folds")
    return np.array_split(np.arange(num_pairs), num_folds)


def accuracy_per_threshold(
    distances: np.ndarray, issame: np.ndarray, thresholds: np.ndarray
) -> np.ndarray:
    """acc(t) = mean[(d < t) == issame]: (N,), (N,), (T,) -> (T,)."""
    predicted_same = distances[:, None] < thresholds[None, :]
    return np.mean(predicted_same == issame[:, None], axis=0)


@dataclass
class VerificationResult:
    """Held-out accuracy per fold and the training-fold threshold used for each."""

    name: str
    num_pairs: int
    accuracy_mean: float
    accuracy_std: float
    fold_accuracies: list[float]
    fold_thresholds: list[float]


def ten_fold_accuracy(
    distances: np.ndarray,
    issame: np.ndarray,
    num_folds: int = 10,
    thresholds: np.ndarray = DEFAULT_THRESHOLDS,
    name: str = "pairs",
) -> VerificationResult:
    """Best threshold on k-1 folds, accuracy on the held-out one; mean and (population) std."""
    distances = np.asarray(distances, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    if distances.shape != issame.shape or distances.ndim != 1:
        raise ValueError(f"distances {distances.shape} and issame {issame.shape} must be (N,)")
    fold_accuracies, fold_thresholds = [], []
    for test_index in contiguous_folds(len(distances), num_folds):
        train_mask = np.ones(len(distances), dtype=bool)
        train_mask[test_index] = False
        train_accuracy = accuracy_per_threshold(
            distances[train_mask], issame[train_mask], thresholds
        )
        best_threshold = thresholds[int(np.argmax(train_accuracy))]
        held_out = accuracy_per_threshold(
            distances[test_index], issame[test_index], np.array([best_threshold])
        )
        fold_accuracies.append(float(held_out[0]))
        fold_thresholds.append(float(best_threshold))
    return VerificationResult(
        name=name,
        num_pairs=len(distances),
        accuracy_mean=float(np.mean(fold_accuracies)),
        accuracy_std=float(np.std(fold_accuracies)),
        fold_accuracies=fold_accuracies,
        fold_thresholds=fold_thresholds,
    )


def evaluate_pairs(
    embeddings: np.ndarray, issame: np.ndarray, num_folds: int = 10, name: str = "pairs"
) -> VerificationResult:
    """10-fold accuracy of unit embeddings (2N, D) laid out pair by pair, issame (N,)."""
    if len(embeddings) != 2 * len(issame):
        raise ValueError(f"{len(embeddings)} embeddings for {len(issame)} pairs; need 2 per pair")
    return ten_fold_accuracy(pair_distances(embeddings), issame, num_folds=num_folds, name=name)


def evaluate_backbone(
    backbone: torch.nn.Module,
    pair_set: PairSet,
    batch_size: int = 64,
    device: str = "cpu",
    num_folds: int = 10,
) -> VerificationResult:
    """Embed a pair set with flip-sum and run the k-fold protocol."""
    embeddings = embed_with_flip(backbone, pair_set.images, batch_size, device)
    return evaluate_pairs(embeddings, pair_set.issame, num_folds, pair_set.name)


def format_table(results: Sequence[VerificationResult]) -> str:
    """Plain-text table: one row per set (accuracy % mean +- std) and the mean over sets."""
    lines = [f"{'set':<12} {'pairs':>7} {'accuracy (%)':>18}"]
    for result in results:
        accuracy = f"{100 * result.accuracy_mean:.2f} +- {100 * result.accuracy_std:.2f}"
        lines.append(f"{result.name:<12} {result.num_pairs:>7} {accuracy:>18}")
    mean = 100 * float(np.mean([r.accuracy_mean for r in results]))
    lines.append(f"{'mean':<12} {'':>7} {mean:>18.2f}")
    return "\n".join(lines)


def results_to_json(results: Sequence[VerificationResult], **metadata: object) -> dict:
    """JSON-ready dict: per-set results and the mean accuracy over sets."""
    return {
        **metadata,
        "sets": {r.name: asdict(r) for r in results},
        "mean_accuracy": float(np.mean([r.accuracy_mean for r in results])),
    }


def load_backbone(path: str | Path, device: str) -> torch.nn.Module:
    """arcface_torch `.pth`/`.pt` -> IResNet (raw embeddings); `.onnx`/`.safetensors` -> encoder."""
    import arcface

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone {path} does not exist (pass --backbone backbone.pth)")
    if path.suffix in (".pth", ".pt"):
        return arcface.load_iresnet(path, device=device)
    # ArcFaceEncoder L2-normalises each view before the flip sum; insightface sums raw ones.
    return arcface.load_arcface(path, device=device)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = runs.argument_parser(__doc__)
    parser.add_argument(
        "--backbone",
        required=True,
        help="recogniser weights: arcface_torch backbone.pth (as train_fr.py "
        "writes) or .onnx/.safetensors via arcface.load_arcface",
    )
    parser.add_argument(
        "--bin",
        action="append",
        required=True,
        dest="bins",
        help="insightface verification .bin (repeat: lfw, cfp_fp, agedb_30, "
        "calfw, cplfw); the set is named by the file stem",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON file for the results (default: verification.json beside the backbone)",
    )
    parser.add_argument(
        "--batch_size", type=runs.POSITIVE_INT, default=64, help="images per forward pass"
    )
    parser.add_argument(
        "--num_folds", type=runs.Number(int, low=2), default=10, help="folds of the protocol"
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    args = parser.parse_args(argv)
    runs.check_numbers(args, parser)
    stems = [Path(b).stem for b in args.bins]
    if len(set(stems)) != len(stems):
        parser.error(f"--bin files must have distinct names, got {stems}")
    return args


def main(args: argparse.Namespace) -> dict:
    runs.setup_logging()
    backbone = load_backbone(args.backbone, args.device)
    results = []
    for bin_path in args.bins:
        pair_set = load_bin(bin_path)
        logger.info("%s: %d pairs", pair_set.name, len(pair_set.issame))
        results.append(
            evaluate_backbone(backbone, pair_set, args.batch_size, args.device, args.num_folds)
        )
    print(format_table(results))
    payload = results_to_json(results, backbone=str(args.backbone), bins=list(args.bins))
    out = Path(args.out) if args.out else Path(args.backbone).with_name("verification.json")
    atomic_write_json(out, payload)
    logger.info("wrote %s", out)
    return payload


if __name__ == "__main__":
    runs.run_cli("verify.py", parse_args, main)
