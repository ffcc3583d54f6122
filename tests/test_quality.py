"""quality.py: CR-FIQA checkpoints (official keys, strict loading), quality scores, summaries."""

import statistics
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_arcface import (
    insightface_iresnet_shapes,
    reference_iresnet_forward,
    rgb,
    synthetic_state_dict,
    tom_hanks_canvas,
)

import arcface
import faces as face_tools
import quality
from image_sets import STATUS_NO_FACE, STATUS_OK, STATUS_UNREADABLE, cached_rows
from random_models import calibrate_batchnorm


def crfiqa_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official CR-FIQA backbone.pth: arcface_torch keys + `qs` (512 -> 1)."""
    return {
        **insightface_iresnet_shapes(arcface.IRESNET_LAYERS[name]),
        "qs.weight": (1, 512),
        "qs.bias": (1,),
    }


@pytest.fixture(scope="module")
def tom_and_flip() -> np.ndarray:
    """(2, 112, 112, 3) uint8: insightface's aligned Tom_Hanks_54745.png and its mirror image."""
    face = rgb("Tom_Hanks_54745.png")
    return np.stack([face, np.ascontiguousarray(face[:, ::-1])])


@pytest.fixture(scope="module")
def r18_model(tom_and_flip) -> quality.CRFIQANet:
    torch.manual_seed(0)
    noise = torch.rand((6, 3, 112, 112), generator=torch.Generator().manual_seed(1)) * 2 - 1
    faces = torch.cat([arcface.images_to_arcface_input(tom_and_flip), noise])
    return calibrate_batchnorm(quality.build_crfiqa("r18"), [faces])


@pytest.fixture(scope="module")
def r18_checkpoint(tmp_path_factory, r18_model) -> Path:
    path = (
        tmp_path_factory.mktemp("crfiqa") / "1000backbone.pth"
    )  # official naming: <step>backbone.pth
    torch.save(r18_model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def dlib_detector() -> face_tools.DlibFaceDetector:
    return face_tools.DlibFaceDetector()


@pytest.fixture(scope="module")
def colour_face(dlib_detector) -> np.ndarray:
    """(112, 112, 3) uint8 aligned crop of the largest face in insightface's t1.jpg (colour;
    Tom_Hanks_54745.png is grey, so it cannot tell RGB from BGR)."""
    group = rgb("t1.jpg")
    return face_tools.align_face(group, dlib_detector.detect_landmarks(group))


# ---------------------------------------------------------------------------------------------
# Architecture and checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", quality.CRFIQA_DEPTHS)
def test_keys_and_shapes_are_the_official_ones(name):
    with torch.device("meta"):
        model = quality.build_crfiqa(name)
    state = model.state_dict()
    assert {key: tuple(value.shape) for key, value in state.items()} == crfiqa_shapes(name)
    assert list(state)[-2:] == ["qs.weight", "qs.bias"]  # the head follows `features`
    assert arcface.infer_iresnet_depth(state) == name


def test_forward_matches_functional_reference(tmp_path, tom_and_flip):
    state = synthetic_state_dict(crfiqa_shapes("r18"), seed=3)
    path = tmp_path / "181952backbone.pth"
    torch.save(state, path)
    model = quality.load_crfiqa(path)
    x = arcface.images_to_arcface_input(tom_and_flip)
    with torch.no_grad():
        embedding, score = model(x)
    reference = reference_iresnet_forward(state, x)
    assert embedding.shape == (2, 512) and score.shape == (2, 1)
    torch.testing.assert_close(embedding, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        score, F.linear(reference, state["qs.weight"], state["qs.bias"]), rtol=1e-4, atol=1e-4
    )


def test_r50_state_dict_loads_strictly_with_every_tensor(tom_and_flip):
    state = synthetic_state_dict(crfiqa_shapes("r50"), seed=4)
    model = quality.crfiqa_from_state_dict(state)
    assert not model.training
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 14, 3]
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())
    with torch.no_grad():
        _, score = model(arcface.images_to_arcface_input(tom_and_flip[:1]))
    assert torch.isfinite(score).all()


def test_random_model_round_trips_through_a_pth(r18_model, r18_checkpoint, tom_and_flip):
    loaded = quality.load_crfiqa(r18_checkpoint)
    assert not loaded.training
    x = arcface.images_to_arcface_input(tom_and_flip)
    with torch.no_grad():
        original, reloaded = r18_model(x), loaded(x)
    for before, after in zip(original, reloaded, strict=True):
        assert torch.isfinite(before).all()
        assert torch.equal(before, after)


def test_bad_checkpoints_are_clear_errors(tmp_path, r18_checkpoint):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(r18_checkpoint.read_bytes()[:20_000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        quality.load_crfiqa(truncated)

    plain = tmp_path / "arcface_backbone.pth"
    torch.save(arcface.build_iresnet("r18").state_dict(), plain)
    with pytest.raises(ValueError, match="without the quality head"):
        quality.load_crfiqa(plain)

    state = torch.load(r18_checkpoint, weights_only=True)
    with pytest.raises(ValueError, match=r"unexpected keys: extra\.weight"):
        quality.crfiqa_from_state_dict({**state, "extra.weight": torch.zeros(1)})
    two_scores = {**state, "qs.weight": torch.zeros(2, 512), "qs.bias": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"shape mismatch: qs\.weight"):
        quality.crfiqa_from_state_dict(two_scores)
    r200 = synthetic_state_dict(crfiqa_shapes("r200"), device="meta")  # no official r200
    with pytest.raises(ValueError, match="CR-FIQA defines depths"):
        quality.crfiqa_from_state_dict(r200)
    with pytest.raises(FileNotFoundError, match="32572backbone.pth"):
        quality.load_crfiqa(tmp_path / "missing.pth")
    nan = {**state, "qs.weight": torch.full_like(state["qs.weight"], float("nan"))}
    torch.save(nan, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match=r"NaN/inf in 1 tensors \(e\.g\. qs\.weight\).*broken"):
        quality.load_crfiqa(tmp_path / "nan.pth")


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
def test_aligned_faces_get_the_quality_head_output(r18_model, tom_and_flip, colour_face):
    faces = np.concatenate([tom_and_flip, colour_face[None], colour_face[None, ..., ::-1]])
    scorer = quality.CRFIQAScorer(r18_model, batch_size=3)
    scores = scorer.score_aligned(faces)
    assert scores.dtype == np.float32 and scores.shape == (4,)
    assert np.isfinite(scores).all()
    assert scores[0] != scores[1]  # the mirror image is a different input
    assert abs(scores[2] - scores[3]) > 1e-3  # so channel order is visible in the comparison
    # evaluation/QualityModel.py: RGB (B, 3, 112, 112), imgs.div_(255).sub_(0.5).div_(0.5)
    official_input = torch.from_numpy(faces.transpose(0, 3, 1, 2).astype(np.float32))
    with torch.no_grad():
        _, direct = r18_model(official_input.div(255).sub(0.5).div(0.5))
    np.testing.assert_allclose(scores, direct[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    one_at_a_time = quality.CRFIQAScorer(r18_model, batch_size=1).score_aligned(faces)
    np.testing.assert_allclose(one_at_a_time, scores, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="aligned 112x112"):
        scorer.score([np.zeros((512, 512, 3), np.uint8)])


def test_image_files_get_scores_or_status_and_cache(
    tmp_path, r18_model, tom_and_flip, dlib_detector
):
    canvas, _, _ = tom_hanks_canvas()
    images = {
        "tom.png": tom_and_flip[0],
        "canvas.png": canvas,
        "grey.png": np.full((96, 128, 3), 128, np.uint8),
    }
    for file_name, image in images.items():
        cv2.imwrite(str(tmp_path / file_name), image[..., ::-1])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not an image")
    paths = [tmp_path / name for name in (*images, "broken.png")]
    scorer = quality.CRFIQAScorer(r18_model, dlib_detector, weights="r18")
    assert scorer.name == "crfiqa-r18-dlib-hog68-rgb"

    rows, status = quality.score_image_files(scorer, paths)
    assert rows.shape == (4, 1) and rows.dtype == np.float32
    assert status.tolist() == [STATUS_OK, STATUS_OK, STATUS_NO_FACE, STATUS_UNREADABLE]
    assert np.isfinite(rows[:2]).all() and np.isnan(rows[2:]).all()
    crop = face_tools.align_face(tom_and_flip[0], dlib_detector.detect_landmarks(tom_and_flip[0]))
    np.testing.assert_allclose(rows[0], scorer.score_aligned(crop[None]), rtol=1e-5, atol=1e-5)

    cache = tmp_path / "cache" / f"quality-{scorer.name}.npz"
    first = cached_rows(paths, lambda batch: quality.score_image_files(scorer, batch), cache)

    def refuse(batch):
        raise AssertionError(f"cached files were scored again: {batch}")

    second = cached_rows(paths, refuse, cache)
    for a, b, c in zip((rows, status), first, second, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert quality.quality_summary(rows, status)["n"] == 2


def test_build_quality_scorer_on_aligned_crops(r18_checkpoint, r18_model, tom_and_flip):
    scorer = quality.build_quality_scorer(
        r18_checkpoint, face_detector=None, batch_size=4, setting="crfiqa-rgb"
    )
    assert scorer.name == f"crfiqa-{arcface.weights_name(r18_checkpoint)}-aligned-rgb"
    scores, found = scorer.score(list(tom_and_flip))
    assert found.all()
    expected = quality.CRFIQAScorer(r18_model).score_aligned(tom_and_flip)
    np.testing.assert_array_equal(scores, expected)


def test_paper_setting_is_cr_fiqa_s_fed_bgr_as_id_booths_script(tmp_path, colour_face):
    """ID-Booth's getQualityScore: cv2.imread of a PIL-saved RGB crop (so BGR), transposed,
    /255 - 0.5 / 0.5, into iresnet50 + qs, no conversion."""
    state = synthetic_state_dict(crfiqa_shapes("r50"), seed=5)
    weights = tmp_path / "32572backbone.pth"
    torch.save(state, weights)
    crop_file = tmp_path / "crop.png"
    Image.fromarray(colour_face).save(crop_file)  # the paper's crops: PIL-saved RGB
    official = cv2.imread(str(crop_file))  # (112, 112, 3) BGR, never converted
    blob = torch.from_numpy(official.transpose(2, 0, 1)[None].astype(np.float32))
    model = quality.crfiqa_from_state_dict(state)
    with torch.no_grad():
        _, official_score = model(blob.div(255).sub(0.5).div(0.5))
    scorer = quality.build_quality_scorer(weights, face_detector=None)  # default: paper
    assert scorer.channel_order == "BGR" and scorer.name.endswith("-aligned-bgr")
    scores, found = scorer.score([colour_face])
    assert found.all()
    np.testing.assert_allclose(scores, official_score[:, 0].numpy(), rtol=1e-4, atol=1e-4)
    rgb_scorer = quality.build_quality_scorer(weights, None, setting="crfiqa-rgb")
    assert abs(rgb_scorer.score([colour_face])[0][0] - scores[0]) > 1e-3  # the order matters


def test_paper_setting_refuses_another_model_and_names_are_not_doubled(tmp_path, r18_model):
    weights = tmp_path / "crfiqa_r18_random.pth"
    torch.save(r18_model.state_dict(), weights)
    with pytest.raises(ValueError, match="CR-FIQA\\(S\\).*r18.*--quality_setting crfiqa-rgb"):
        quality.build_quality_scorer(weights, None)
    scorer = quality.build_quality_scorer(weights, None, setting="crfiqa-rgb")
    assert scorer.name.startswith("crfiqa-r18_random-") and "crfiqa-crfiqa" not in scorer.name
    with pytest.raises(ValueError, match="options: \\['paper', 'crfiqa-rgb'\\]"):
        quality.quality_setting("bgr")


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
def test_quality_summary_matches_statistics():
    scores = np.array([[2.5], [0.25], [np.nan], [1.0], [3.0]], dtype=np.float32)
    status = np.array([STATUS_OK, STATUS_OK, STATUS_NO_FACE, STATUS_OK, STATUS_OK])
    kept = [2.5, 0.25, 1.0, 3.0]
    summary = quality.quality_summary(scores, status)
    assert summary["n"] == 4
    assert summary["mean"] == pytest.approx(statistics.fmean(kept))
    assert summary["std"] == pytest.approx(statistics.pstdev(kept))
    assert summary["median"] == pytest.approx(statistics.median(kept))
    with pytest.raises(ValueError, match="non-finite"):
        quality.quality_summary(scores)
    with pytest.raises(ValueError, match="status of shape"):
        quality.quality_summary(scores, status[:3])
    empty = quality.quality_summary(scores, np.full(5, STATUS_NO_FACE))
    assert empty["n"] == 0 and np.isnan(empty["mean"])
