"""Evaluation/evaluate.py end to end on real faces (insightface's shipped photos, dlib's shipped
embedder or a random ArcFace), a tiny random DINOv2, and broken / faceless images."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from evaluation_data import (
    add_bad_images,
    build_tiny_dinov2,
    real_face_crops,
    write_identity_folders,
)
from PIL import Image

import evaluate
import fileio
import metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "Evaluation" / "evaluate.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """real: 5 people x 2 variants; genA: 5 x 3 + a faceless and a broken file; genB: 3 x 2."""
    root = tmp_path_factory.mktemp("evaluation_data")
    crops = real_face_crops()
    names = sorted(crops)[:5]
    paths = {
        "real": write_identity_folders(root / "real", crops, names, 2),
        "genA": write_identity_folders(root / "genA", crops, names, 3),
        "genB": write_identity_folders(root / "genB", crops, names[:3], 2),
        "dino": build_tiny_dinov2(root / "dino"),
    }
    add_bad_images(paths["genA"] / names[0])
    Image.new("RGB", (64, 64)).save(paths["genA"] / "stray.png")  # outside identity folders
    Image.new("RGB", (64, 64)).save(paths["genA"] / names[1] / "grid.jpg")  # a contact sheet
    paths["loras"] = write_training_logs(root / "loras")
    return paths


# train_ID-Booth.py's tags for --loss triplet (Slot.tags, log_interval, log_epoch).
TRAIN_TERMS = (
    "loss",
    "diffusion_loss",
    "prior_loss",
    "triplet_loss",
    "identity_term",
    "identity_weight",
    "identity_samples_per_batch",
)


def logged_value(term_index: int, step: int, run: int) -> float:
    """The value the fake trainer logs: distinct per term, step and run (0 first, 1 resumed)."""
    return 100.0 * run + 10.0 * term_index + 1.0 / step


def write_training_logs(root: Path) -> Path:
    """LoRA root with real TensorBoard logs: person_0 ran steps 1-5, was resumed from step 3 and
    ran to 6 (a second event file rewriting steps 3-5); person_1 logs to a custom logging_dir
    named in its training_config.json; person_2 has a config but no logs."""
    from torch.utils.tensorboard import SummaryWriter

    def run(log_dir: Path, steps: range, index: int) -> None:
        writer = SummaryWriter(log_dir=str(log_dir))
        for step in steps:
            for term_index, term in enumerate(TRAIN_TERMS):
                writer.add_scalar(f"train/{term}", logged_value(term_index, step, index), step)
            writer.add_scalar("train/lr", 1e-4, step)
            writer.add_scalar("train/identity_samples", 2 * step, step)
        writer.add_scalar("epoch/loss", logged_value(0, steps[-1], index), 0)
        writer.close()

    run(root / "person_0" / "logs", range(1, 6), 0)
    run(root / "person_0" / "logs", range(3, 7), 1)
    (root / "person_1").mkdir(parents=True)
    (root / "person_1" / "training_config.json").write_text('{"args": {"logging_dir": "tb"}}')
    run(root / "person_1" / "tb", range(1, 4), 0)
    (root / "person_2").mkdir()
    (root / "person_2" / "training_config.json").write_text('{"args": {"logging_dir": "logs"}}')
    return root


def strict_json(path: Path) -> dict:
    """Parse JSON refusing NaN / Infinity tokens."""

    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def dlib_argv(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        f"--generated=A={data['genA']}",
        f"--generated={data['genB']}",
        f"--real={data['real']}",
        "--embedder=dlib",
        f"--out={out}",
        *extra,
    ]


FEATURE_FLAGS = ("--feature_image_size=56", "--kd_subsets=10")


def refuse(*args, **kwargs):
    raise AssertionError("a cached image was embedded again")


BANNER = "Random-weight models: every number below is plumbing, not quality <ok>"


def report_flags(data: dict[str, Path]) -> tuple[str, ...]:
    """A banner, training logs for A and a missing log folder for genB."""
    return (
        f"--banner={BANNER}",
        f"--training_logs=A={data['loras']}",
        f"--training_logs=genB={data['loras'] / 'no-such-run'}",
    )


@pytest.fixture(scope="module")
def cli_run(data, tmp_path_factory) -> Path:
    """The real command line (subprocess), identity only: no --feature_model; report_flags,
    default grids and pose."""
    out = tmp_path_factory.mktemp("report")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), *dlib_argv(data, out, *report_flags(data))],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def full_run(cli_run, data) -> Path:
    """Same folder again with DINOv2 features: faces must come from the cache."""
    import face_embedding

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(face_embedding.DlibEmbedder, "embed", refuse)
        features = (f"--feature_model={data['dino']}", *FEATURE_FLAGS)
        argv = dlib_argv(data, cli_run, *features, *report_flags(data))
        evaluate.main(evaluate.parse_args(argv))
    return cli_run


def test_cli_writes_identity_metrics_report_and_plots(cli_run):
    results = strict_json(cli_run / "metrics.json")
    assert results["embedder"] == "dlib-resnet128-hog5"
    sets = results["sets"]
    assert sets["A"]["n_images"] == 17 and sets["A"]["n_with_face"] == 15
    assert sets["A"]["no_face"] == ["person_0/zz_noise.png"]
    assert sets["A"]["unreadable"] == ["person_0/zz_broken.png"]
    assert sets["A"]["excluded"] == ["person_1/grid.jpg"]
    assert sets["A"]["loose_files"] == ["stray.png"]
    assert (sets["genB"]["n_identities"], sets["genB"]["n_images"]) == (3, 6)
    assert sets["real"]["role"] == "real" and sets["real"]["n_with_face"] == 10
    identity = results["identity"]
    assert set(identity) == {"synthetic_vs_synthetic", "synthetic_vs_real", "real_vs_real"}
    within_a = identity["synthetic_vs_synthetic"]["A"]
    assert (within_a["n_genuine"], within_a["n_impostor"]) == (3 * 1 + 4 * 3, 105 - 15)
    assert within_a["eer"] == 0.0 and within_a["auc"] == 1.0 and within_a["decidability"] > 4
    cross_b = identity["synthetic_vs_real"]["genB"]
    assert (cross_b["n_genuine"], cross_b["n_impostor"]) == (3 * 2 * 2, 6 * 10 - 12)
    assert set(within_a["fnmr_at_fmr"]) == {"0.01", "0.001"}
    assert "--feature_model" in results["diversity"]["skipped"]
    assert "--feature_model" in results["fidelity"]["skipped"]
    assert "FMR = FNMR" in results["definitions"]["eer"]
    directions = results["directions"]
    assert directions["eer_fvc2000"] == "lower" and directions["fdr"] == "higher"
    assert results["definitions"]["eer_fvc2000"].startswith("↓ lower is better: EER as pyeer")
    report = (cli_run / "report.html").read_text()
    assert re.search(r"<h2>(.*?)</h2>", report).group(1) == "Summary (the paper's columns)"
    # 3 comparisons x hist/ROC/DET, a pose scatter per set (A, genB, real), A's training curves
    assert report.count("data:image/png;base64,") == 9 + 3 + 1
    for text in ("zz_noise.png", "zz_broken.png", "stray.png", "genB", "EER", "decidability"):
        assert text in report
    assert not list(cli_run.glob("**/*.tmp"))


def test_features_add_diversity_and_fidelity_from_cached_faces(full_run, data):
    from features import FeatureExtractor
    from image_sets import load_image_set

    results = strict_json(full_run / "metrics.json")
    diversity = results["diversity"]
    assert diversity["A"]["n_images"] == 16 and diversity["A"]["n_identities"] == 5  # readable
    assert 1.0 <= diversity["A"]["mean"] <= 3.0 and set(diversity) == {"A", "genB", "real"}
    fidelity = results["fidelity"]["A"]
    assert (
        fidelity["frechet_distance"]["n_real"],
        fidelity["frechet_distance"]["n_generated"],
    ) == (
        10,
        16,
    )
    assert fidelity["kernel_distance"]["n_subsets"] == 10
    assert fidelity["kernel_distance"]["subset_size"] == 10
    assert fidelity["prdc"]["k"] == 5 and set(results["fidelity"]) == {"A", "genB"}
    report = (full_run / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 10 + 3 + 1  # + Vendi box plot, pose, training
    assert "coverage" in report and "Vendi" in report
    assert "k=5, 6 / 6 of 10 / 6" in report  # genB's PRDC: 6 of each set drawn
    assert len(list((full_run / "plots").glob("*.png"))) == 10 + 3 + 1
    # The numbers equal features computed directly from the files.
    extractor = FeatureExtractor(data["dino"], image_size=56)

    def features(folder: Path) -> np.ndarray:
        image_set = load_image_set("x", folder)
        return extractor.embed([Image.open(p).convert("RGB") for p in image_set.paths])

    real, fake = features(data["real"]), features(data["genB"])
    genb = results["fidelity"]["genB"]
    expected = metrics.frechet_distance_features(real, fake)["value"]
    assert genb["frechet_distance"]["value"] == pytest.approx(expected, rel=1e-4)
    import reference_prdc  # PRDC draws min(10000, 10, 6) = 6 images of each set

    rows_real, rows_fake = reference_prdc.dgm_eval_prdc_rows(len(real), len(fake), 10_000, 0)
    expected = metrics.prdc(real[rows_real], fake[rows_fake], k=5)  # prdc itself needs >= 7
    assert {key: genb["prdc"][key] for key in expected} == pytest.approx(expected)
    assert (genb["prdc"]["n_real"], genb["prdc"]["n_real_available"]) == (6, 10)


def test_row_cache_resumes_and_follows_file_content(tmp_path):
    from image_sets import STATUS_OK, cached_rows

    folder = tmp_path / "files"
    folder.mkdir()
    paths = []
    for index in range(5):
        paths.append(folder / f"{index}.txt")
        paths[-1].write_text(f"content {index}")
    computed: list[str] = []

    def compute(batch):
        computed.extend(path.name for path in batch)
        rows = np.array([[float(path.read_text().split()[-1]), 1.0] for path in batch])
        return rows, np.full(len(batch), STATUS_OK, dtype=np.int8)

    cache = tmp_path / "cache" / "rows.npz"
    rows, status = cached_rows(paths, compute, cache, batch_size=2)
    np.testing.assert_array_equal(rows[:, 0], np.arange(5))
    assert computed == [f"{i}.txt" for i in range(5)] and (status == STATUS_OK).all()
    computed.clear()
    paths[3].write_text("content 30")  # changed content: recomputed; the rest come from disk
    paths.append(folder / "copy.txt")
    paths[-1].write_text("content 1")  # same bytes as 1.txt: a cache hit under another name
    rows, _ = cached_rows(paths, compute, cache, batch_size=2)
    assert computed == ["3.txt"]
    np.testing.assert_array_equal(rows[:, 0], [0, 1, 2, 30, 4, 1])
    assert not list(cache.parent.glob("*.tmp"))


def test_arcface_embedder_path_matches_direct_embedding(data, tmp_path, monkeypatch):
    import torch

    import arcface
    import datasets
    import faces

    detector = faces.build_face_detector("dlib")
    monkeypatch.setattr(faces, "build_face_detector", lambda *args, **kwargs: detector)
    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    torch.save(arcface.build_iresnet("r18").state_dict(), weights)
    args = evaluate.parse_args(
        [
            f"--generated=B={data['genB']}",
            f"--arcface_weights={weights}",
            "--face_detector=dlib",
            f"--out={tmp_path / 'out'}",
        ]
    )
    results = evaluate.main(args)
    assert results["embedder"].startswith("arcface-r18-")
    assert results["diversity"] == {"skipped": results["fidelity"]["skipped"]}
    assert "feature_model" in results["fidelity"]["skipped"]
    # Same numbers as embedding the files directly with the foundation's functions.
    from image_sets import load_image_set

    image_set = load_image_set("B", data["genB"])
    images = [np.asarray(Image.open(p).convert("RGB")) for p in image_set.paths]
    embeddings, found = datasets.annotate_images(images, detector, arcface.load_arcface(weights))
    assert found.all()
    genuine, impostor = metrics.within_set_scores(embeddings, image_set.identities)
    expected = metrics.verification_metrics(genuine, impostor)
    measured = results["identity"]["synthetic_vs_synthetic"]["B"]
    assert measured["eer"] == pytest.approx(expected["eer"])
    assert measured["genuine_mean"] == pytest.approx(expected["genuine_mean"], abs=1e-5)
    assert measured["n_impostor"] == expected["n_impostor"] == 6 * 5 // 2 - 3


def test_sets_without_faces_are_reported_not_fatal(tmp_path):
    noise = np.random.default_rng(1)
    for identity in ("p1", "p2"):
        (tmp_path / "noise" / identity).mkdir(parents=True)
        for k in range(2):
            pixels = noise.integers(0, 255, (80, 80, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "noise" / identity / f"{k}.png")
    (tmp_path / "noise" / "empty").mkdir()
    out = tmp_path / "out"
    results = evaluate.main(
        evaluate.parse_args(
            [f"--generated=N={tmp_path / 'noise'}", "--embedder=dlib", f"--out={out}"]
        )
    )
    assert results["sets"]["N"]["n_no_face"] == 4
    assert results["sets"]["N"]["empty_identities"] == ["empty"]
    assert (
        "no image with a detected face"
        in results["identity"]["synthetic_vs_synthetic"]["N"]["skipped"]
    )
    assert "skipped: no image with a detected face" in (out / "report.html").read_text()
    assert strict_json(out / "metrics.json")["notes"]


def test_argument_errors_are_clear(data, tmp_path):
    with pytest.raises(ValueError, match="needs --arcface_weights"):
        evaluate.parse_args([f"--generated={data['genA']}", f"--out={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate.parse_args(["--generated=X=/no/such/dir", "--embedder=dlib", f"--out={tmp_path}"])
    with pytest.raises(ValueError, match="used twice or reserved"):
        evaluate.parse_args(
            [f"--generated=real={data['genA']}", "--embedder=dlib", f"--out={tmp_path}"]
        )
    with pytest.raises(ValueError, match="targets"):
        evaluate.parse_args(
            [
                f"--generated={data['genA']}",
                "--embedder=dlib",
                "--fmr_targets=0",
                f"--out={tmp_path}",
            ]
        )
    assert evaluate.parse_generated(["a=/x", "/y/z"]) == {"a": Path("/x"), "z": Path("/y/z")}
    from image_sets import load_image_set

    with pytest.raises(ValueError, match="no identity sub-folders"):
        load_image_set("flat", data["genA"] / "person_0")


def test_dgm_eval_preprocessing_and_cls_features(data):
    import torch

    from features import IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor

    extractor = FeatureExtractor(data["dino"], image_size=56)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (90, 70, 3), dtype=np.uint8))
    resized = np.asarray(image.resize((56, 56), Image.BICUBIC), dtype=np.float64) / 255.0
    expected = (resized - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)  # (56, 56, 3)
    pixels = extractor.preprocess([image])  # (1, 3, 56, 56)
    np.testing.assert_allclose(pixels[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)
    with torch.no_grad():
        hidden = extractor.model(pixel_values=pixels).last_hidden_state[:, 0]  # final-LN CLS
    np.testing.assert_allclose(extractor.embed([image]), hidden.numpy(), atol=1e-6)
    assert extractor.feature_dim == 32
    other = FeatureExtractor(data["dino"], image_size=56, protocol="processor")
    assert other.name != extractor.name  # cache keys differ by protocol


def test_identity_comparisons_skip_with_a_reason(tmp_path):
    from image_sets import STATUS_NO_FACE, STATUS_OK, ImageSet

    def embedded(names: list[str], status: list[int]) -> evaluate.EmbeddedSet:
        paths = [tmp_path / name / f"{k}.png" for k, name in enumerate(names)]
        image_set = ImageSet("s", tmp_path, paths, names)
        rows = np.random.default_rng(len(names)).normal(size=(len(names), 8))
        return evaluate.EmbeddedSet(image_set, rows, np.array(status, dtype=np.int8))

    faces = {
        "one_identity": embedded(["a", "a", "a"], [STATUS_OK] * 3),
        "singletons": embedded(["a", "b", "c"], [STATUS_OK] * 3),
        "other_names": embedded(["x", "x", "y", "y"], [STATUS_OK] * 4),
        "real": embedded(["a", "a", "b", "b"], [STATUS_OK, STATUS_NO_FACE, STATUS_OK, STATUS_OK]),
    }
    args = evaluate.parse_args(
        [f"--generated={tmp_path}", "--embedder=dlib", f"--out={tmp_path}_report"]
    )
    results, scores = evaluate.identity_metrics(
        faces, ["one_identity", "singletons", "other_names"], args
    )
    within, cross = results["synthetic_vs_synthetic"], results["synthetic_vs_real"]
    assert "no impostor pair" in within["one_identity"]["skipped"]
    assert "no genuine pair" in within["singletons"]["skipped"]
    assert (
        within["other_names"]["n_genuine"] == 2
        and "other_names" in scores["synthetic_vs_synthetic"]
    )
    assert "no identity name is shared" in cross["other_names"]["skipped"]
    # 'singletons' vs real: a-a gives 1 pair (the faceless real 'a' is left out), b-b gives 2.
    assert cross["singletons"]["n_genuine"] == 1 + 2
    assert results["real_vs_real"]["real"]["n_genuine"] == 1


def features_set(tmp_path: Path, rows: np.ndarray) -> evaluate.EmbeddedSet:
    """An EmbeddedSet of given feature rows (one identity, every row usable)."""
    from image_sets import STATUS_OK, ImageSet

    paths = [tmp_path / "x" / f"{k}.png" for k in range(len(rows))]
    image_set = ImageSet("s", tmp_path, paths, ["x"] * len(rows))
    return evaluate.EmbeddedSet(image_set, rows, np.full(len(rows), STATUS_OK, dtype=np.int8))


def test_fidelity_prdc_draws_the_same_number_of_images_from_both_sets(tmp_path):
    import reference_prdc

    rng = np.random.default_rng(0)
    centres = 40.0 * np.eye(12)[:6]  # the same 6 well-separated clusters for both sets
    real = centres[rng.integers(0, 6, 2000)] + rng.normal(size=(2000, 12))
    fake = centres[rng.integers(0, 6, 500)] + rng.normal(size=(500, 12))
    features = {"real": features_set(tmp_path, real), "gen": features_set(tmp_path, fake)}
    args = evaluate.parse_args(
        [f"--generated={tmp_path}", "--embedder=dlib", f"--out={tmp_path}_report", "--seed=4"]
    )
    args.kd_subsets = 2
    prdc = evaluate.fidelity_metrics(features, ["gen"], args)["gen"]["prdc"]
    assert (prdc["n_real"], prdc["n_generated"]) == (500, 500)  # min(10000, 2000, 500) each
    assert (prdc["n_real_available"], prdc["n_generated_available"]) == (2000, 500)
    assert prdc["coverage"] > 0.92  # one distribution: 0.969 expected (0.673 at 2000 vs 500)
    rows_real, rows_fake = reference_prdc.dgm_eval_prdc_rows(2000, 500, 10_000, seed=4)
    expected = reference_prdc.compute_prdc(real[rows_real], fake[rows_fake], 5)
    assert {key: prdc[key] for key in expected} == pytest.approx(expected, abs=1e-12)


def test_missing_feature_model_is_a_clear_error(tmp_path):
    from features import FeatureExtractor

    with pytest.raises(FileNotFoundError, match="cannot load feature model"):
        FeatureExtractor(tmp_path / "no-such-dinov2")
    with pytest.raises(ValueError, match="options"):
        FeatureExtractor(tmp_path, protocol="other")


def test_an_unusable_feature_model_is_refused_while_parsing(tmp_path, monkeypatch):
    """Offline and not cached, or a folder that is no model: refused before any image is read,
    naming the flag; 'none' turns the feature metrics off."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "gen").mkdir()
    argv = [f"--generated={tmp_path / 'gen'}", f"--out={tmp_path / 'out'}", "--embedder=dlib"]
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache.*--feature_model"):
        evaluate.parse_args([*argv, "--feature_model=facebook/dinov2-large"])
    with pytest.raises(FileNotFoundError, match="gen has no config.json; pass --feature_model"):
        evaluate.parse_args([*argv, f"--feature_model={tmp_path / 'gen'}"])
    assert evaluate.parse_args([*argv, "--feature_model=none"]).feature_model is None


# ------------------------------------------------------------------ report figures


def plotted(figure) -> list[tuple[np.ndarray, np.ndarray]]:
    """(x, y) data of every line of a one-axis figure."""
    return [tuple(np.asarray(v) for v in line.get_data()) for line in figure.axes[0].get_lines()]


def as_counts(roc: metrics.RocCurve, fmr: np.ndarray, fnmr: np.ndarray) -> set[tuple[int, int]]:
    """(FMR, FNMR) points as (accepted impostors, rejected genuines) counts of `roc`'s sets."""
    impostors = np.rint(fmr * roc.n_impostor).astype(int)
    genuines = np.rint(fnmr * roc.n_genuine).astype(int)
    return set(zip(impostors.tolist(), genuines.tolist(), strict=True))


@pytest.fixture(scope="module")
def paper_scale_roc() -> metrics.RocCurve:
    """3,000 genuine vs 1.5M impostor scores (paper-scale impostor count): FMR steps of 6.7e-7."""
    rng = np.random.default_rng(0)
    return metrics.roc_curve(rng.normal(0.6, 0.1, 3000), rng.normal(0.1, 0.1, 1_500_000))


def test_det_reaches_the_smallest_fmr_the_data_give_without_a_jump(paper_scale_roc):
    from scipy.stats import norm

    import report

    roc = paper_scale_roc
    figure = report.det_figure({"m": roc})
    ((x, y),) = plotted(figure)
    fmr, fnmr = norm.cdf(x), norm.cdf(y)
    zero = 0.5 / roc.n_impostor  # where FMR 0 is drawn
    assert fmr[0] == pytest.approx(zero) and np.all(fmr[1:] > 1.5 * zero)  # one FMR-0 point
    assert fmr[1] == pytest.approx(1 / roc.n_impostor)  # the smallest FMR the data can give
    assert np.sum(fmr < 1e-5) > 5  # the curve runs below the old floor 1e-5
    # Every point is a true operating point: no clipped (jumped) ones. The first is the
    # lowest FNMR at FMR 0 (~0.5 here), not ~1 as when all FMR < 1e-5 were drawn at 1e-5.
    assert as_counts(roc, fmr[1:], fnmr[1:]) <= as_counts(roc, roc.fmr, roc.fnmr)
    assert fnmr[0] == pytest.approx(roc.fnmr[np.flatnonzero(roc.fmr == 0)[-1]])
    assert np.all(np.diff(fnmr) <= 1e-12)  # non-increasing: no jump back up
    assert figure.axes[0].get_xlim()[0] < norm.ppf(zero)  # visible
    assert "1e-6" in [tick.get_text() for tick in figure.axes[0].get_xticklabels()]
    assert len(x) < 2 * (roc.n_genuine + 2)  # only the corners of the staircase are drawn


def test_roc_reaches_the_smallest_fmr_the_data_give(paper_scale_roc):
    import report

    roc = paper_scale_roc
    figure = report.roc_figure({"m": roc})
    ((fmr, tpr),) = plotted(figure)
    zero = 0.5 / roc.n_impostor
    assert figure.axes[0].get_xlim()[0] == pytest.approx(zero)
    assert fmr[0] == pytest.approx(zero) and np.sum(fmr == fmr[0]) == 1
    assert fmr[1] == pytest.approx(1 / roc.n_impostor) and np.sum(fmr < 1e-5) > 5
    assert as_counts(roc, fmr[1:], 1 - tpr[1:]) <= as_counts(roc, roc.fmr, roc.fnmr)
    assert len(report.figure_png(figure)) > 1000


@pytest.mark.parametrize(
    "genuine, impostor",
    [([0.5], [0.4]), ([0.3] * 3, [0.3] * 4), ([0.1, 0.2], [0.8, 0.9, 0.7]), ([0.9], [0.9, 0.1])],
)
def test_roc_and_det_of_tiny_score_sets_render(genuine, impostor):
    import warnings

    import report

    rocs = {"tiny": metrics.roc_curve(genuine, impostor)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no log(0) / ppf(0) on the way
        for figure in (report.roc_figure(rocs), report.det_figure(rocs)):
            assert report.figure_png(figure).startswith(b"\x89PNG")
            ((x, y),) = plotted(figure)
            assert np.all(np.isfinite(x)) and np.all(np.isfinite(y))
            assert np.all(np.isfinite(figure.axes[0].get_xlim()))


def test_a_report_folder_inside_an_input_folder_is_refused(data, tmp_path):
    """The report's own files (plots, caches) would otherwise be read as an identity's images."""
    for out in (data["genA"] / "report", data["genA"]):
        with pytest.raises(ValueError, match="overlap"):
            evaluate.parse_args([f"--generated={data['genA']}", "--embedder=dlib", f"--out={out}"])


# ------------------------------------------------------ grids, banner, training, quality, pose


def grid_sections(page: str) -> dict[str, str]:
    """{method: HTML of its grid section}."""
    return dict(re.findall(r'<section class="grid" data-method="([^"]+)">(.*?)</section>', page))


def thumbnails_of(section: str, set_name: str) -> list[bytes]:
    """Decoded JPEG thumbnails of one set (by their alt text) in an HTML fragment."""
    pattern = rf'<img alt="{set_name}/[^"]+" class="thumb"[^>]*src="data:image/jpeg;base64,([^"]+)"'
    return [base64.b64decode(encoded) for encoded in re.findall(pattern, section)]


def test_grids_embed_generated_beside_real_thumbnails_in_one_file(cli_run, data):
    results = strict_json(cli_run / "metrics.json")
    grids = results["grids"]
    assert (grids["max_images"], grids["max_identities"], grids["real_set"]) == (6, 8, "real")
    rows_a = grids["methods"]["A"]["rows"]
    assert list(rows_a) == [f"person_{k}" for k in range(5)]
    # zz_broken.png does not decode: passed over; the faceless noise image is a sample too.
    assert rows_a["person_0"]["generated"] == [
        "person_0/0.png",
        "person_0/1.png",
        "person_0/2.png",
        "person_0/zz_noise.png",
    ]
    assert rows_a["person_0"]["real"] == ["person_0/0.png", "person_0/1.png"]
    assert list(grids["methods"]["genB"]["rows"]) == ["person_0", "person_1", "person_2"]
    page = (cli_run / "report.html").read_text()
    sections = grid_sections(page)
    assert set(sections) == {"A", "genB"}
    assert (len(thumbnails_of(sections["A"], "A")), len(thumbnails_of(sections["A"], "real"))) == (
        4 + 3 * 4,
        2 * 5,
    )
    assert len(thumbnails_of(sections["genB"], "genB")) == 3 * 2
    assert len(thumbnails_of(sections["genB"], "real")) == 3 * 2
    assert page.count("data:image/jpeg;base64,") == 16 + 10 + 6 + 6
    assert page.index('class="grid"') < page.index("<h2>Image sets</h2>")  # faces first
    # Self-contained: every resource is inline, nothing points at a file or the web.
    assert not re.search(r"https?://", page)
    assert set(re.findall(r'(?:src|href)="([a-z]+:)', page)) == {"data:"}
    assert page.count("src=") == page.count('src="data:')
    thumbnail = Image.open(io.BytesIO(thumbnails_of(sections["A"], "real")[0]))
    assert thumbnail.format == "JPEG" and max(thumbnail.size) == 96
    # The first real thumbnail is person_0/0.png itself, shrunk.
    original = Image.open(data["real"] / "person_0" / "0.png").convert("RGB").resize((96, 96))
    difference = np.abs(np.asarray(thumbnail, float) - np.asarray(original, float)).mean()
    assert difference < 6


def test_grid_caps_and_identities_without_real_photos(data):
    import grids
    import report
    from image_sets import load_image_set

    # A "real" set with only 3 of A's 5 identities.
    sets = {"A": load_image_set("A", data["genA"]), "real": load_image_set("real", data["genB"])}
    shown, thumbnails = grids.build_grids(sets, ["A"], "real", max_images=2, max_identities=4)
    rows = shown["methods"]["A"]["rows"]
    assert list(rows) == ["person_0", "person_1", "person_2", "person_3"]
    assert all(len(row["generated"]) == 2 for row in rows.values())
    assert [len(row["real"]) for row in rows.values()] == [2, 2, 2, 0]
    assert shown["methods"]["A"]["n_identities"] == 5
    assert sorted(thumbnails["A"]) == sorted(f for row in rows.values() for f in row["generated"])
    page = report.grids_section(shown, thumbnails)
    assert page.count("data:image/jpeg;base64,") == 8 + 6
    assert "no real photos of this identity" in page
    assert "4 of 5 identities" in page
    natural = [Path(name) for name in ("10.png", "2.png", "1.png")]
    assert sorted(natural, key=grids.natural_key) == [Path("1.png"), Path("2.png"), Path("10.png")]


def test_banner_is_the_first_thing_in_the_report(cli_run):
    assert strict_json(cli_run / "metrics.json")["banner"] == BANNER
    page = (cli_run / "report.html").read_text()
    body = page[page.index("<body>") + len("<body>") :]
    escaped = BANNER.replace("<", "&lt;").replace(">", "&gt;")
    assert body.startswith(f'<div class="banner">{escaped}</div>')


def test_training_curves_keep_the_last_value_of_each_step(data, cli_run):
    import report
    import training_logs

    summary, curves = training_logs.read_training_logs(data["loras"])
    steps, values = curves["person_0"]["train/triplet_loss"]
    assert steps == [1, 2, 3, 4, 5, 6]  # the resumed run rewrote 3-5 and added 6
    assert values == pytest.approx(
        [logged_value(3, 1, 0), logged_value(3, 2, 0)]
        + [logged_value(3, k, 1) for k in (3, 4, 5, 6)]
    )
    assert curves["person_1"]["train/loss"][0] == [1, 2, 3]  # read from its config's "tb"
    assert summary["missing"] == [
        {"identity": "person_2", "looked_at": str(data["loras"] / "person_2" / "logs")}
    ]
    assert training_logs.curve_panels(curves) == list(TRAIN_TERMS)
    figure = report.training_figure(curves, "A")
    titled = [axis for axis in figure.axes if axis.get_visible()]
    assert [axis.get_title() for axis in titled] == list(TRAIN_TERMS)
    lines = {line.get_label(): line for line in titled[3].get_lines()}
    assert set(lines) == {"person_0", "person_1"}
    np.testing.assert_allclose(lines["person_0"].get_ydata(), values)
    # Through the command line: summaries in metrics.json, the figure and notes in the report.
    training = strict_json(cli_run / "metrics.json")["training"]["methods"]
    loss = training["A"]["identities"]["person_0"]["tags"]["train/loss"]
    assert (loss["n_points"], loss["first_step"], loss["last_step"]) == (6, 1, 6)
    assert loss["last"] == pytest.approx(logged_value(0, 6, 1))
    assert training["A"]["figure"] == "training_A"
    missing = data["loras"] / "no-such-run"
    assert training["genB"]["looked_at"] == str(missing) and "skipped" in training["genB"]
    page = (cli_run / "report.html").read_text()
    assert 'alt="training_A"' in page
    assert f"no TensorBoard scalars in <code>{data['loras'] / 'person_2' / 'logs'}</code>" in page
    assert "No training curves: no identity run" in page and str(missing) in page


def test_quality_says_how_to_get_the_weights_without_them(cli_run):
    quality = strict_json(cli_run / "metrics.json")["quality"]
    assert quality["skipped"].startswith("not computed: pass --quality_weights")
    page = (cli_run / "report.html").read_text()
    assert "not computed: pass --quality_weights" in page
    for where in ("github.com/fdbtrs/CR-FIQA", "CC BY-NC 4.0", "181952backbone.pth"):
        assert where in page


def test_pose_of_a_face_and_its_mirror_image_through_evaluate(cli_run, data):
    import pose as pose_tools

    pose = strict_json(cli_run / "metrics.json")["pose"]
    assert pose["angle_order"] == ["yaw", "pitch", "roll"]
    real = pose["sets"]["real"]
    assert (real["n_faces"], real["n_no_face"], real["n_identities"]) == (10, 0, 5)
    estimator = pose_tools.PoseEstimator()
    turned = 0
    for person in range(5):
        original = np.array(real["per_image"][f"person_{person}/0.png"])
        mirrored = np.array(real["per_image"][f"person_{person}/1.png"])  # variant 1 = mirror
        image = np.asarray(Image.open(data["real"] / f"person_{person}" / "0.png").convert("RGB"))
        np.testing.assert_allclose(original, estimator.estimate_image(image), atol=1e-3)
        assert abs(original[1] - mirrored[1]) < 4  # pitch stays
        spread = real["per_identity"][f"person_{person}"]
        assert spread["yaw"] == pytest.approx(abs(original[0] - mirrored[0]) / 2, abs=1e-4)
        if abs(original[0]) > 10:
            turned += 1
            assert np.sign(mirrored[0]) == -np.sign(original[0])  # yaw flips
            assert abs(original[0] + mirrored[0]) < 0.15 * abs(original[0])
    assert turned >= 2
    generated = pose["sets"]["A"]
    assert generated["no_face"] == ["person_0/zz_noise.png"] and generated["n_unreadable"] == 1
    assert generated["n_faces"] == 15 and generated["figure"] == "pose_A"
    page = (cli_run / "report.html").read_text()
    assert "Head pose (yaw" in page and 'alt="pose_real"' in page
    assert pose["estimator"] == "dlib-hog68-pnp14" and pose["comparable_with_paper"] is False
    assert "not comparable with the paper" in page
    yaws = np.array([values[0] for values in real["per_image"].values()])
    assert real["all_faces"]["yaw"] == pytest.approx({"mean": yaws.mean(), "std": yaws.std()})


def test_pose_weights_run_6drepnet_on_aligned_padded_faces(data, tmp_path):
    """--pose_weights: 6DRepNet (a random backbone whose head always says pitch 10, yaw 25,
    roll -5) on every detected face; the section says it compares with the paper."""
    from test_pose_6drepnet import constant_pose_checkpoint

    weights = constant_pose_checkpoint(tmp_path / "6drepnet.pth", pitch=10.0, yaw=25.0, roll=-5.0)
    argv = dlib_argv(data, tmp_path / "out", f"--pose_weights={weights}", "--face_detector=dlib")
    args = evaluate.parse_args(argv)
    args.device = "cpu"
    pose, angles = evaluate.pose_section(evaluate.load_sets(args), args)
    assert pose["comparable_with_paper"] is True
    estimator = pose["estimator"]
    assert estimator.startswith("6drepnet-") and "6drepnet-6drepnet" not in estimator
    assert estimator.endswith("-dlib-hog68-pad30")
    real = pose["sets"]["real"]
    assert real["n_faces"] == 10 and real["n_no_face"] == 0
    for angle, value in zip(("yaw", "pitch", "roll"), (25.0, 10.0, -5.0), strict=True):
        assert real["all_faces"][angle]["mean"] == pytest.approx(value, abs=1e-3)
        assert real["all_faces"][angle]["std"] == pytest.approx(0.0, abs=1e-3)
    assert pose["sets"]["A"]["no_face"] == ["person_0/zz_noise.png"]
    with pytest.raises(FileNotFoundError, match="--pose_weights"):
        evaluate.parse_args([*argv, f"--pose_weights={tmp_path / 'none.pth'}"])


@pytest.mark.slow
def test_quality_from_a_crfiqa_checkpoint_grid_caps_and_no_pose(data, tmp_path):
    import torch

    import quality
    from image_sets import load_image_set

    torch.manual_seed(0)
    weights = tmp_path / "32572backbone.pth"
    torch.save(quality.build_crfiqa("r18").state_dict(), weights)
    out = tmp_path / "report"
    argv = dlib_argv(
        data,
        out,
        f"--quality_weights={weights}",
        "--face_detector=dlib",
        "--quality_setting=crfiqa-rgb",
        "--no-pose",
        "--grid_images=2",
        "--grid_identities=3",
    )
    results = evaluate.main(evaluate.parse_args(argv))
    scorer = quality.build_quality_scorer(weights, "dlib", setting="crfiqa-rgb")
    for name, folder in (("A", data["genA"]), ("real", data["real"])):
        rows, status = quality.score_image_files(scorer, load_image_set(name, folder).paths)
        expected = quality.quality_summary(rows, status)
        measured = results["quality"]["sets"][name]
        assert {key: measured[key] for key in expected} == pytest.approx(expected, rel=1e-5)
    assert results["quality"]["sets"]["A"]["n_no_face"] == 1
    assert results["quality"]["sets"]["A"]["n_unreadable"] == 1
    assert results["pose"] == {"skipped": "--no-pose given"}
    page = (out / "report.html").read_text()
    assert 'alt="quality_hist"' in page and "not computed" not in page
    assert "--no-pose given" in page and 'alt="pose_' not in page
    sections = grid_sections(page)
    for method in ("A", "genB"):
        rows = results["grids"]["methods"][method]["rows"]
        assert list(rows) == ["person_0", "person_1", "person_2"]
        assert len(thumbnails_of(sections[method], method)) == 3 * 2
        assert len(thumbnails_of(sections[method], "real")) == 3 * 2
    assert page.count("data:image/jpeg;base64,") == 24
    assert results["training"] == {"skipped": "no --training_logs NAME=LORA_ROOT given"}


def test_report_flag_errors_are_clear(data, tmp_path):
    base = [f"--generated=A={data['genA']}", "--embedder=dlib", f"--out={tmp_path / 'out'}"]
    with pytest.raises(ValueError, match="not a --generated name"):
        evaluate.parse_args([*base, f"--training_logs=B={data['loras']}"])
    with pytest.raises(ValueError, match="expected NAME=LORA_ROOT"):
        evaluate.parse_args([*base, f"--training_logs={data['loras']}"])
    with pytest.raises(ValueError, match="given twice"):
        evaluate.parse_args([*base, "--training_logs=A=x", "--training_logs=A=y"])
    with pytest.raises(FileNotFoundError, match="--quality_weights"):
        evaluate.parse_args([*base, f"--quality_weights={tmp_path / 'none.pth'}"])
    with pytest.raises(ValueError, match="--grid_images"):
        evaluate.parse_args([*base, "--grid_images=0"])
    assert evaluate.parse_args(base).pose and not evaluate.parse_args([*base, "--no-pose"]).pose


def test_statistics_over_no_face_show_as_not_available():
    import report

    assert report.format_value(float("nan")) == "n/a" and report.format_value(0.5) == "0.5"
    entry = {"mean": float("nan"), "std": float("nan")}
    assert report._mean_std(entry, "mean", "std") == "n/a"
    assert report._mean_std({"mean": 1.0, "std": 0.25}, "mean", "std") == "1.000 ± 0.250"


def numbered_files(folder: Path, count: int) -> list[Path]:
    """`count` small text files whose content is their number."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{index}.txt" for index in range(count)]
    for index, path in enumerate(paths):
        path.write_text(f"content {index}")
    return paths


def number_rows(batch):
    """compute() of the cache tests: the file's number and 1.0 per file, all ok."""
    from image_sets import STATUS_OK

    rows = np.array([[float(path.read_text().split()[-1]), 1.0] for path in batch])
    return rows, np.full(len(batch), STATUS_OK, dtype=np.int8)


def test_row_cache_writes_each_row_once_per_pass(tmp_path, monkeypatch):
    """The cache grows by appending: a pass over N new images writes N rows, not N^2 / chunk."""
    import image_sets

    written_rows = []
    write = image_sets.atomic_write_bytes

    def counting_write(path, data, **kwargs):
        with np.load(io.BytesIO(data)) as stored:
            written_rows.append(len(stored["keys"]))
        write(path, data, **kwargs)

    monkeypatch.setattr(image_sets, "atomic_write_bytes", counting_write)
    monkeypatch.setattr(image_sets, "CACHE_SAVE_EVERY", 4)
    paths = numbered_files(tmp_path / "files", 40)
    cache = tmp_path / "cache" / "rows"
    rows, _ = image_sets.cached_rows(paths, number_rows, cache, batch_size=2)
    np.testing.assert_array_equal(rows[:, 0], np.arange(40))
    assert written_rows == [4] * 10  # ten saves of the four new rows each
    written_rows.clear()
    paths += numbered_files(tmp_path / "more", 43)[40:]  # three new files
    rows, _ = image_sets.cached_rows(paths, number_rows, cache, batch_size=2)
    assert written_rows == [3] and rows[-1, 0] == 42


def test_a_killed_pass_loses_only_its_unsaved_rows_and_a_torn_part_is_recomputed(
    tmp_path, monkeypatch
):
    import image_sets

    monkeypatch.setattr(image_sets, "CACHE_SAVE_EVERY", 4)
    paths = numbered_files(tmp_path / "files", 10)
    cache = tmp_path / "cache" / "rows"
    computed: list[str] = []

    def killed_after_six(batch):
        if len(computed) >= 6:
            raise KeyboardInterrupt
        computed.extend(path.name for path in batch)
        return number_rows(batch)

    with pytest.raises(KeyboardInterrupt):
        image_sets.cached_rows(paths, killed_after_six, cache, batch_size=2)
    assert len(list(cache.glob("part-*.npz"))) == 1  # rows 0-3 saved, 4-5 unsaved

    def counting(batch):
        computed.extend(path.name for path in batch)
        return number_rows(batch)

    computed.clear()
    rows, _ = image_sets.cached_rows(paths, counting, cache, batch_size=2)
    assert computed == [f"{i}.txt" for i in range(4, 10)]
    np.testing.assert_array_equal(rows[:, 0], np.arange(10))
    # Truncate the first part (rows 0-3): named in a warning, removed, those rows recomputed.
    parts = sorted(cache.glob("part-*.npz"), key=lambda part: part.stat().st_mtime_ns)
    parts[0].write_bytes(parts[0].read_bytes()[:-40])
    computed.clear()
    with pytest.warns(UserWarning, match=re.escape(parts[0].name)):
        rows, _ = image_sets.cached_rows(paths, counting, cache, batch_size=2)
    assert computed == [f"{i}.txt" for i in range(4)]
    np.testing.assert_array_equal(rows[:, 0], np.arange(10))
    # A flipped bit inside a part's values: the zip CRC catches it, the same way.
    part = max(cache.glob("part-*.npz"), key=lambda part: (part != parts[0], part.stat().st_size))
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    computed.clear()
    with pytest.warns(UserWarning, match="Bad CRC-32"):
        rows, _ = image_sets.cached_rows(paths, counting, cache, batch_size=2)
    assert computed == [f"{i}.txt" for i in range(4, 8)]  # the part of rows 4-7
    np.testing.assert_array_equal(rows[:, 0], np.arange(10))
    assert not list(cache.glob("*.tmp"))


@pytest.fixture(scope="module")
def crops() -> dict:
    return real_face_crops()


def people(root: Path, crops: dict, folders: dict[str, str], count: int = 2) -> Path:
    """ROOT/<folder name>/<k>.png: `count` variants of the person each folder name maps to."""
    for folder, person in folders.items():
        write_identity_folders(root, {folder: crops[person]}, [folder], count)
    return root


def test_all_pairs_beyond_the_memory_are_refused_before_embedding(data, tmp_path, monkeypatch):
    import face_embedding

    monkeypatch.setattr(face_embedding.DlibEmbedder, "embed", refuse)
    monkeypatch.setattr(evaluate, "physical_memory_bytes", lambda: 10_000)
    argv = dlib_argv(data, tmp_path / "out", "--max_impostor_pairs=0")
    with pytest.raises(ValueError, match=r"all pairs \(--max_impostor_pairs 0\): [\d,]+ impostor"):
        evaluate.main(evaluate.parse_args(argv))
    image_sets = evaluate.load_sets(evaluate.parse_args(argv))
    evaluate.check_pair_memory(image_sets, 10, 10_000)  # a sample that fits passes
    # The estimate counts the pairs identity_metrics will score (every image a face).
    genuine_a, impostor_a = metrics.within_set_pairs(image_sets["A"].identities)
    assert evaluate.planned_impostor_pairs(image_sets, None)[0] == len(impostor_a)


def test_a_root_of_variant_folders_is_named(crops, tmp_path):
    for variant in ("dreambooth", "triplet"):
        people(tmp_path / "generated" / variant, crops, {"p": "person_0"}, 1)
    root = tmp_path / "generated"
    argv = [f"--generated={root}", "--embedder=dlib", f"--out={tmp_path / 'out'}"]
    with pytest.raises(ValueError, match=r"holds folders of identity folders \(dreambooth, trip"):
        evaluate.load_sets(evaluate.parse_args(argv))
    with pytest.raises(ValueError, match=f"--generated dreambooth={root.as_posix()}/dreambooth"):
        evaluate.load_sets(evaluate.parse_args(argv))


def test_a_real_folder_one_level_above_its_identities_is_refused(crops, tmp_path):
    """--real DATA where DATA holds class/ (images) beside identities/<identity>/: not a set of
    one identity 'class' with the rest ignored, but an error naming the folder to pass."""
    data = tmp_path / "data"
    people(data / "identities", crops, {"p": "person_0"}, 1)
    people(data, crops, {"class": "person_1"}, 1)
    generated = people(tmp_path / "gen", crops, {"p": "person_0"}, 1)
    argv = [f"--generated=G={generated}", f"--real={data}", "--embedder=dlib"]
    with pytest.raises(ValueError, match=f"one level too high: identities holds .* {data}/ident"):
        evaluate.load_sets(evaluate.parse_args([*argv, f"--out={tmp_path / 'out'}"]))


def test_identity_names_match_by_nfc_and_unmatched_names_are_warned(crops, tmp_path, capsys):
    composed, decomposed = "Jos\u00e9", "Jose\u0301"  # the same name, as Linux and macOS store it
    real = people(
        tmp_path / "real",
        crops,
        {composed: "person_0", "Anna": "person_1", "tom": "tom_hanks", "zoe": "person_2"},
    )
    generated = people(
        tmp_path / "gen", crops, {decomposed: "person_0", "anna": "person_1", "tom": "tom_hanks"}
    )
    argv = [f"--generated=G={generated}", f"--real={real}", "--embedder=dlib", "--no-pose"]
    results = evaluate.main(evaluate.parse_args([*argv, f"--out={tmp_path / 'out'}"]))
    assert results["identity"]["synthetic_vs_real"]["G"]["n_genuine"] == 2 * (2 * 2)  # José, tom
    console = capsys.readouterr().err
    expected = (
        "G: 2 of 3 identities match a --real identity by name; 1 only in G ('anna'), "
        "2 only in --real ('Anna', 'zoe')",
        "G: 1 unmatched by letter case only ('anna' ~ 'Anna'); rename one side",
    )
    for line in expected:
        assert line in console and any(line in note for note in results["notes"])


def test_identity_folders_equal_after_nfc_are_merged_and_case_collisions_named(crops, tmp_path):
    from image_sets import load_image_set

    composed, decomposed = "Jos\u00e9", "Jose\u0301"
    root = people(
        tmp_path / "set",
        crops,
        {composed: "person_0", decomposed: "person_0", "Anna": "person_1", "anna": "person_2"},
    )
    image_set = load_image_set("S", root)
    assert image_set.identities.count(composed) == 4 and decomposed not in image_set.identities
    notes = " | ".join(image_set.name_notes)
    assert f"are one identity {composed!r} after Unicode NFC normalisation" in notes
    assert "identities 'Anna', 'anna' differ only in letter case" in notes


def test_a_permission_denied_image_is_unreadable_not_fatal(crops, tmp_path, monkeypatch):
    import builtins

    generated = people(tmp_path / "gen", crops, {"a": "person_0", "b": "person_1"}, 3)
    locked = generated / "a" / "1.png"
    open_file = builtins.open

    def denying_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return open_file(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denying_open)
    argv = [f"--generated=G={generated}", "--embedder=dlib", f"--out={tmp_path / 'out'}"]
    results = evaluate.main(evaluate.parse_args(argv))
    assert results["sets"]["G"]["unreadable"] == ["a/1.png"]
    assert results["identity"]["synthetic_vs_synthetic"]["G"]["n_genuine"] == 1 + 3
    assert "G: 1 unreadable images" in " ".join(results["notes"])


def test_dollar_signs_in_names_and_tags_are_plain_text(crops, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    names = {r"$\notasymbol$": "person_0", "$x^$": "person_1"}
    generated = people(tmp_path / "gen", crops, names)
    writer = SummaryWriter(log_dir=str(tmp_path / "loras" / r"$\notasymbol$" / "logs"))
    for step in (1, 2):
        writer.add_scalar("train/loss", 1.0 / step, step)
        writer.add_scalar(r"train/$\oops$", 2.0 / step, step)
    writer.close()
    method = r"$\method$"
    argv = [
        f"--generated={method}={generated}",
        f"--training_logs={method}={tmp_path / 'loras'}",
        "--embedder=dlib",
        f"--out={tmp_path / 'out'}",
    ]
    results = evaluate.main(evaluate.parse_args(argv))
    plots = {path.stem for path in (tmp_path / "out" / "plots").glob("*.png")}
    assert {"synthetic_vs_synthetic_hist", "synthetic_vs_synthetic_roc"} <= plots
    assert {results["pose"]["sets"][method]["figure"], "training__method_"} <= plots


def test_a_figure_that_fails_is_lost_alone_with_a_warning(data, tmp_path, monkeypatch, capsys):
    import report

    def broken(*args, **kwargs):
        raise ValueError("cannot draw this")

    monkeypatch.setattr(report, "det_figure", broken)
    out = tmp_path / "out"
    argv = [f"--generated=B={data['genB']}", "--embedder=dlib", "--no-pose", f"--out={out}"]
    evaluate.main(evaluate.parse_args(argv))
    assert "figure synthetic_vs_synthetic_det not drawn (ValueError: cannot draw this)" in (
        capsys.readouterr().err
    )
    assert (out / "plots" / "synthetic_vs_synthetic_roc.png").is_file()
    assert not (out / "plots" / "synthetic_vs_synthetic_det.png").exists()
    assert "synthetic_vs_synthetic_roc" in (out / "report.html").read_text()


def test_a_single_file_cache_of_earlier_versions_is_still_read(tmp_path):
    from image_sets import STATUS_OK, cached_rows

    paths = numbered_files(tmp_path / "files", 3)
    keys = np.array([fileio.file_sha256(path) for path in paths])
    values = np.array([[7.0, 7.0], [8.0, 8.0], [9.0, 9.0]], dtype=np.float32)
    (tmp_path / "cache").mkdir()
    status = np.full(3, STATUS_OK, dtype=np.int8)
    np.savez(tmp_path / "cache" / "rows.npz", keys=keys, values=values, status=status)
    rows, _ = cached_rows(paths, refuse, tmp_path / "cache" / "rows")
    np.testing.assert_array_equal(rows, values)
