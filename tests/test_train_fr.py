"""Evaluation/train_fr.py + margin_heads.py: heads vs their formulas, data prep, train/resume."""

import importlib.util
import io
import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import arcface
import faces as face_tools
import margin_heads
import train_fr
import verify

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "Evaluation" / "train_fr.py"
IMAGES_DIR = Path(importlib.util.find_spec("insightface").origin).parent / "data" / "images"


# ---------------------------------------------------------------------------------------------
# Margin heads against their formulas
# ---------------------------------------------------------------------------------------------
def reference_cosines(head, embeddings):
    """float64 cos(theta_ij) from the head's weights, computed independently in numpy."""
    z = embeddings.double().numpy()
    w = head.weight.detach().double().numpy()
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    return z @ w.T


def test_cosface_logits_are_s_times_cos_minus_m_on_the_target():
    torch.manual_seed(0)
    head = margin_heads.CosFaceHead(16, 7)
    embeddings, labels = torch.randn(5, 16) * 9, torch.tensor([0, 3, 6, 3, 1])
    cos = reference_cosines(head, embeddings)
    expected = 64.0 * cos
    expected[np.arange(5), labels.numpy()] = 64.0 * (cos[np.arange(5), labels.numpy()] - 0.4)
    np.testing.assert_allclose(head(embeddings, labels).detach().numpy(), expected, atol=2e-4)


def test_arcface_logits_are_s_times_cos_theta_plus_m_on_the_target():
    torch.manual_seed(1)
    head = margin_heads.ArcFaceHead(16, 7)
    embeddings, labels = torch.randn(6, 16), torch.tensor([2, 2, 0, 5, 6, 1])
    # sample 5 points exactly away from its class: theta = pi, theta + m > pi -> fallback
    embeddings[5] = -head.weight.detach()[1] * 3
    cos = reference_cosines(head, embeddings)
    rows, targets = np.arange(6), labels.numpy()
    theta = np.arccos(np.clip(cos[rows, targets], -1, 1))
    expected = 64.0 * cos
    expected[rows, targets] = 64.0 * np.where(
        theta + 0.5 <= np.pi, np.cos(theta + 0.5), cos[rows, targets] - 0.5 * np.sin(0.5)
    )
    logits = head(embeddings, labels)
    np.testing.assert_allclose(logits.detach().numpy(), expected, atol=2e-4)
    assert theta[5] + 0.5 > np.pi  # the fallback branch was exercised
    F.cross_entropy(logits, labels).backward()
    assert torch.isfinite(head.weight.grad).all()


class OfficialAdaFace:
    """Numpy transcription of AdaFace.forward in github.com/mk-minchul/AdaFace head.py."""

    def __init__(self, kernel, m=0.4, h=0.333, s=64.0, t_alpha=0.01):
        self.kernel = kernel  # (D, C) as the official code stores it
        self.m, self.h, self.s, self.t_alpha, self.eps = m, h, s, t_alpha, 1e-3
        self.batch_mean, self.batch_std = 20.0, 100.0

    def forward(self, embeddings, norms, label):  # embeddings already L2-normalised
        kernel_norm = self.kernel / np.linalg.norm(self.kernel, axis=0, keepdims=True)
        cosine = np.clip(embeddings @ kernel_norm, -1 + self.eps, 1 - self.eps)
        safe_norms = np.clip(norms, 0.001, 100)
        mean, std = safe_norms.mean(), safe_norms.std(ddof=1)
        self.batch_mean = mean * self.t_alpha + (1 - self.t_alpha) * self.batch_mean
        self.batch_std = std * self.t_alpha + (1 - self.t_alpha) * self.batch_std
        margin_scaler = (safe_norms - self.batch_mean) / (self.batch_std + self.eps)
        margin_scaler = np.clip(margin_scaler * self.h, -1, 1)
        one_hot = np.zeros_like(cosine)
        one_hot[np.arange(len(label)), label] = 1.0
        m_arc = one_hot * (self.m * margin_scaler * -1)
        theta_m = np.clip(np.arccos(cosine) + m_arc, self.eps, math.pi - self.eps)
        cosine = np.cos(theta_m)
        m_cos = one_hot * (self.m + self.m * margin_scaler)
        return (cosine - m_cos) * self.s


def test_adaface_matches_the_official_formula_over_several_batches():
    torch.manual_seed(2)
    head = margin_heads.AdaFaceHead(32, 9, t_alpha=0.3)  # big alpha: the EMA moves visibly
    official = OfficialAdaFace(head.weight.detach().double().numpy().T.copy(), t_alpha=0.3)
    for step in range(4):
        # norms spread widely so the scaler hits both clip limits
        norms = torch.tensor([0.0005, 3.0, 18.0, 25.0, 60.0, 150.0, 22.0, 20.0])[:, None]
        directions = F.normalize(torch.randn(8, 32), dim=1)
        embeddings = directions * norms * (1 + 0.1 * step)
        labels = torch.randint(0, 9, (8,))
        logits = head(embeddings, labels)
        z = embeddings.double().numpy()
        z_norms = np.linalg.norm(z, axis=1, keepdims=True)
        expected = official.forward(z / z_norms, z_norms, labels.numpy())
        np.testing.assert_allclose(logits.detach().numpy(), expected, atol=5e-4, err_msg=str(step))
        assert head.batch_mean.item() == pytest.approx(official.batch_mean, rel=1e-5)
        assert head.batch_std.item() == pytest.approx(official.batch_std, rel=1e-5)


def test_adaface_statistics_only_move_in_training_mode():
    head = margin_heads.AdaFaceHead(8, 3)
    embeddings, labels = torch.randn(4, 8) * 5, torch.tensor([0, 1, 2, 0])
    head.eval()
    head(embeddings, labels)
    assert head.batch_mean.item() == 20.0 and head.batch_std.item() == 100.0
    head.train()
    head(embeddings, labels)
    expected_mean = 0.99 * 20.0 + 0.01 * embeddings.norm(dim=1).mean().item()
    assert head.batch_mean.item() == pytest.approx(expected_mean, rel=1e-6)


def test_heads_return_float32_logits_under_autocast_and_factory_lists_options():
    for name in ("cosface", "arcface", "adaface"):
        head = margin_heads.build_margin_head(name, 8, 5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(torch.randn(3, 8).bfloat16(), torch.tensor([0, 1, 4]))
        assert logits.dtype == torch.float32 and logits.shape == (3, 5)
    with pytest.raises(ValueError, match=r"sphereface.*adaface.*arcface.*cosface"):
        margin_heads.build_margin_head("sphereface", 8, 5)


# ---------------------------------------------------------------------------------------------
# Tiny image-folder datasets
# ---------------------------------------------------------------------------------------------
def pattern_face(identity: int, variant: int) -> np.ndarray:
    """(112, 112, 3) uint8: an identity-specific blocky pattern plus per-image noise."""
    base = np.random.default_rng(identity).integers(0, 256, (14, 14, 3))
    noise = np.random.default_rng(1000 * identity + variant).normal(0, 20, (112, 112, 3))
    return np.clip(np.kron(base, np.ones((8, 8, 1))) + noise, 0, 255).astype(np.uint8)


def save(image: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def build_mixed_roots(tmp_path: Path) -> tuple[Path, Path]:
    """real/ + synthetic/ roots holding the same two people (1 + 1 and 2 + 0 images), plus junk."""
    real, synthetic = tmp_path / "real", tmp_path / "synthetic"
    save(pattern_face(0, 0), real / "alice" / "0.png")
    save(pattern_face(1, 0), real / "bob" / "0.png")
    save(pattern_face(1, 1), real / "bob" / "1.jpg")
    save(pattern_face(0, 1), synthetic / "alice" / "0.png")
    (synthetic / "carol").mkdir()  # identity folder with zero images: skipped, counted
    (synthetic / "alice" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # corrupt
    (synthetic / "alice" / "notes.txt").write_text("not an image")  # ignored, counted
    (synthetic / ".id_booth_cache").mkdir()  # hidden caches are not identities
    (synthetic / "prompt.json").write_text("{}")  # a file beside the identity folders
    return real, synthetic


def test_scan_merges_same_named_identities_across_roots(tmp_path):
    real, synthetic = build_mixed_roots(tmp_path)
    identities, skips = train_fr.scan_identity_folders([real, synthetic])
    assert list(identities) == ["alice", "bob"]
    assert [p.name for p in identities["alice"]] == ["0.png", "0.png", "broken.png"]
    assert len(identities["bob"]) == 2
    assert skips.empty_identities == ["carol"]
    assert sorted(Path(p).name for p in skips.ignored_files) == ["notes.txt", "prompt.json"]

    apart, _ = train_fr.scan_identity_folders([real, synthetic], keep_roots_apart=True)
    assert sorted(apart) == sorted(
        [str(real / "alice"), str(real / "bob"), str(synthetic / "alice")]
    )


def test_scan_errors_name_the_folder_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        train_fr.scan_identity_folders([tmp_path / "missing"])
    (tmp_path / "empty" / "someone").mkdir(parents=True)
    with pytest.raises(ValueError, match="one sub-folder per identity"):
        train_fr.scan_identity_folders([tmp_path / "empty"])


def test_scan_takes_generation_records_as_expected_not_as_stray_files(tmp_path):
    """inference_ID-Booth.py writes metadata.jsonl and run_config.json beside the identity
    folders: they are part of a generated set, not files the scan skipped."""
    source = (REPO_ROOT / "inference_ID-Booth.py").read_text()
    for name in train_fr.GENERATION_RECORDS:  # the names inference writes, kept in step
        assert f'= "{name}"' in source
    save(pattern_face(0, 0), tmp_path / "generated" / "alice" / "0.png")
    for name in (*train_fr.GENERATION_RECORDS, "notes.txt"):
        (tmp_path / "generated" / name).write_text("{}")
    _, skips = train_fr.scan_identity_folders([tmp_path / "generated"])
    assert [Path(p).name for p in skips.ignored_files] == ["notes.txt"]


def test_scan_names_a_folder_of_generated_sets_and_the_folder_to_pass(tmp_path):
    """reproduce's generated/ holds one set per variant: say so, and which folder to pass."""
    root = tmp_path / "generated"
    for variant in ("dreambooth", "triplet"):
        save(pattern_face(0, 0), root / variant / "alice" / "0.png")
        (root / variant / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError) as error:
        train_fr.scan_identity_folders([root])
    assert str(error.value) == (
        f"--data_dir {root} holds folders of identity folders (dreambooth, triplet), not "
        "identity folders (a folder of generated sets, one per variant?): pass one of them, "
        f"e.g. --data_dir {root / 'dreambooth'}"
    )


def no_detector():
    raise AssertionError("112x112 inputs with --align auto must not need a detector")


def test_prepare_counts_skips_keeps_single_image_identities_and_reuses_the_cache(tmp_path):
    real, synthetic = build_mixed_roots(tmp_path)
    save(np.zeros((100, 120, 3), np.uint8), real / "dave" / "wrong_size.png")
    identities, scan_skips = train_fr.scan_identity_folders([real, synthetic])
    prepared_dir = tmp_path / "prepared"

    prepared = train_fr.prepare_faces(
        identities, prepared_dir, "never", no_detector, "dlib", scan_skips
    )

    assert prepared.identities == ["alice", "bob"]  # dave lost his only image -> skipped
    np.testing.assert_array_equal(prepared.labels, [0, 0, 1, 1])
    faces = prepared.open_faces()
    np.testing.assert_array_equal(faces[1], pattern_face(0, 1))  # alice from synthetic/
    np.testing.assert_array_equal(faces[3], np.asarray(Image.open(real / "bob" / "1.jpg")))
    counts = train_fr.PreparationSkips(**prepared.skips).counts()
    assert counts == {
        "unreadable": 1, "no_face": 0, "not_aligned_size": 1,
        "empty_identities": 2, "ignored_files": 2,
    }  # fmt: skip
    assert sorted(prepared.skips["empty_identities"]) == ["carol", "dave"]

    stamp = (prepared_dir / "faces.npy").stat().st_mtime_ns
    again = train_fr.prepare_faces(
        identities, prepared_dir, "never", no_detector, "dlib", scan_skips
    )
    assert (prepared_dir / "faces.npy").stat().st_mtime_ns == stamp  # reused, not redone
    np.testing.assert_array_equal(again.labels, prepared.labels)
    save(pattern_face(1, 7), real / "bob" / "1.jpg")  # content changed -> prepared again
    changed = train_fr.prepare_faces(
        identities, prepared_dir, "never", no_detector, "dlib", scan_skips
    )
    np.testing.assert_array_equal(
        changed.open_faces()[3], np.asarray(Image.open(real / "bob" / "1.jpg"))
    )


def test_prepare_aligns_unaligned_photos_with_the_real_detector(tmp_path):
    photo = np.asarray(Image.open(IMAGES_DIR / "t1.jpg").convert("RGB"))
    save(photo, tmp_path / "data" / "crowd" / "t1.png")
    save(np.full((150, 150, 3), 127, np.uint8), tmp_path / "data" / "crowd" / "blank.png")
    save(pattern_face(3, 0), tmp_path / "data" / "crowd" / "aligned.png")
    identities, scan_skips = train_fr.scan_identity_folders([tmp_path / "data"])
    detector = face_tools.build_face_detector("dlib")

    prepared = train_fr.prepare_faces(
        identities, tmp_path / "prep", "auto", lambda: detector, detector.name, scan_skips
    )

    assert [Path(p).name for p in prepared.skips["no_face"]] == ["blank.png"]
    faces = prepared.open_faces()
    assert faces.shape == (2, 112, 112, 3)
    np.testing.assert_array_equal(faces[0], pattern_face(3, 0))  # 112x112: taken as aligned
    expected = face_tools.align_face(photo, detector.detect_landmarks(photo))
    np.testing.assert_array_equal(faces[1], expected)


# ---------------------------------------------------------------------------------------------
# Training pieces
# ---------------------------------------------------------------------------------------------
def test_epoch_batches_are_seeded_per_epoch_and_shard_across_processes(tmp_path):
    labels = np.arange(20) % 5
    prepared = train_fr.PreparedFaces(tmp_path / "unused.npy", labels, list("abcde"), {})
    single = train_fr.EpochBatches(prepared, 4, seed=3)
    rank0 = train_fr.EpochBatches(prepared, 2, seed=3, rank=0, world_size=2)
    rank1 = train_fr.EpochBatches(prepared, 2, seed=3, rank=1, world_size=2)
    single.set_epoch(1)
    first_order = single.order.clone()
    single.set_epoch(2)
    assert not torch.equal(single.order, first_order)
    single.set_epoch(1)
    assert torch.equal(single.order, first_order)  # depends only on (seed, epoch)
    assert single.steps_per_epoch() == rank0.steps_per_epoch() == 5
    for shard in (rank0, rank1):
        shard.set_epoch(1)
    together = torch.cat(
        [
            torch.cat([rank0.order[k * 4 : k * 4 + 2], rank1.order[k * 4 + 2 : k * 4 + 4]])
            for k in range(5)
        ]
    )
    assert torch.equal(together, first_order)  # the two ranks split each global batch
    assert pickle.loads(pickle.dumps(single))._faces is None  # workers re-open the memory map


def test_model_input_mirrors_exactly_the_flagged_images():
    faces = torch.from_numpy(np.stack([pattern_face(0, 0), pattern_face(1, 0)]))
    images = train_fr.to_model_input(faces, torch.tensor([True, False]))
    reference = arcface.images_to_arcface_input(faces)
    assert torch.equal(images[0], reference[0].flip(2))
    assert torch.equal(images[1], reference[1])


def test_no_weight_decay_on_batchnorm_and_frozen_features_weight_untrained():
    args = train_fr.parse_args(["--data_dir", "x", "--output_dir", "y", "--backbone", "r18",
                                "--mixed_precision", "no"])  # fmt: skip
    model = train_fr.build_model(args, num_classes=3)
    decay, no_decay = train_fr.parameter_groups(model, 5e-4)
    bn_params = {
        id(p)
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        for p in m.parameters()
        if p.requires_grad
    }
    assert {id(p) for p in no_decay["params"]} == bn_params
    decayed = {id(p) for p in decay["params"]}
    assert id(model.head.weight) in decayed and id(model.backbone.fc.weight) in decayed
    assert id(model.backbone.features.weight) not in decayed | bn_params
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (5e-4, 0)
    # The ID-Booth protocol's SGD(model.parameters(), weight_decay=...): BatchNorm decays too.
    every, none = train_fr.parameter_groups(model, 5e-4, decay_batchnorm=True)
    assert {id(p) for p in every["params"]} == decayed | bn_params and not none["params"]


def test_bad_options_fail_right_after_parsing(tmp_path):
    base = [
        "--data_dir",
        str(tmp_path),
        "--output_dir",
        str(tmp_path / "o"),
        "--mixed_precision",
        "no",
    ]
    with pytest.raises(ValueError, match=r"sphereface.*adaface.*arcface.*cosface"):
        train_fr.parse_args([*base, "--head", "sphereface"])
    with pytest.raises(ValueError, match=r"r7.*r100.*r18.*r200.*r34.*r50"):
        train_fr.parse_args([*base, "--backbone", "r7"])
    with pytest.raises(ValueError, match="batch_size"):
        train_fr.parse_args([*base, "--batch_size", "1"])
    # fp16 follows the one precision rule of every script (runs.resolve_mixed_precision);
    # accelerate then runs it in fp32 on the CPU, with a warning (test below).
    assert train_fr.parse_args([*base[:-2]]).mixed_precision == "fp16"
    assert train_fr.parse_args([*base, "--head", "arcface"]).margin == 0.5
    assert train_fr.parse_args([*base, "--head", "cosface"]).margin == 0.4


# ---------------------------------------------------------------------------------------------
# The script: a few steps on a tiny folder dataset; loss falls; resume continues exactly
# ---------------------------------------------------------------------------------------------
def run_script(*flags: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=600, cwd=cwd
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_training_runs_loss_falls_and_resume_continues_exactly(tmp_path):
    real, synthetic = build_mixed_roots(tmp_path)  # 2 people x 2 images once merged
    eval_bin = tmp_path / "pairs.bin"
    pair_images = [pattern_face(i // 4, i % 4 + 2) for i in range(20)]
    verify.write_bin(eval_bin, [verify_png(i) for i in pair_images], [True, False] * 5)
    common = [
        "--data_dir", str(real), "--data_dir", str(synthetic), "--backbone", "r18",
        "--head", "adaface", "--batch_size", "4", "--max_train_steps", "4",
        "--learning_rate", "0.01",  # the paper's 0.1 is too hot for a 4-image set
        "--lr_milestones", "3", "--mixed_precision", "no", "--log_every", "1",
        "--checkpointing_steps", "2", "--checkpoints_total_limit", "0",
        "--dataloader_num_workers", "0", "--seed", "5",
    ]  # fmt: skip
    straight = tmp_path / "straight"
    straight_flags = ["--output_dir", str(straight), "--eval_bin", str(eval_bin)]
    straight_flags += ["--eval_every_epochs", "0"]
    run_script(*common, *straight_flags, cwd=tmp_path)

    log = read_log(straight / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    losses = [r["loss"] for r in log]
    assert np.mean(losses[-2:]) < 0.5 * np.mean(losses[:2]), losses
    # one epoch = one step here; lr x0.1 once 3 epochs are done (step 4)
    assert [r["lr"] for r in log] == pytest.approx([0.01] * 3 + [0.001])
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    config = json.loads((straight / "config.json").read_text())
    assert config["identities"] == ["alice", "bob"] and config["num_classes"] == 2
    assert (
        config["skip_counts"]["unreadable"] == 1 and config["skip_counts"]["empty_identities"] == 1
    )
    assert config["global_step"] == 4 and config["head"] == "adaface"
    backbone = arcface.load_iresnet(straight / "backbone.pth")
    assert arcface.infer_iresnet_depth(backbone.state_dict()) == "r18"
    verification = json.loads((straight / "verification.json").read_text())
    assert verification["step"] == 4 and 0 <= verification["mean_accuracy"] <= 1
    assert verification["sets"]["pairs"]["num_pairs"] == 10

    resumed = tmp_path / "resumed"
    resumed_flags = ["--output_dir", str(resumed), "--resume_from_checkpoint"]
    resumed_flags += [
        str(straight / "checkpoint-2"),
        "--prepared_dir",
        str(straight / "prepared_faces"),
    ]
    run_script(*common, *resumed_flags, cwd=tmp_path)

    resumed_log = read_log(resumed / "train_log.jsonl")
    assert [r["step"] for r in resumed_log] == [3, 4]
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in log[2:]]  # bit-exact
    straight_state = torch.load(straight / "backbone.pth", weights_only=True)
    resumed_state = torch.load(resumed / "backbone.pth", weights_only=True)
    assert straight_state.keys() == resumed_state.keys()
    for key, value in straight_state.items():
        assert torch.equal(value, resumed_state[key]), key
    final = torch.load(straight / "checkpoint-4" / "training_state.pt", weights_only=True)
    again = torch.load(resumed / "checkpoint-4" / "training_state.pt", weights_only=True)
    assert torch.equal(final["model"]["head.batch_mean"], again["model"]["head.batch_mean"])
    assert (
        final["optimizer"]["param_groups"][0]["lr"] == again["optimizer"]["param_groups"][0]["lr"]
    )

    # a finished run asked to resume does no more work; a fresh run refuses to overwrite it
    finished_flags = ["--output_dir", str(straight), "--resume_from_checkpoint", "latest"]
    finished = run_script(*common, *finished_flags, cwd=tmp_path)
    assert "already finished" in finished.stderr
    assert len(read_log(straight / "train_log.jsonl")) == 4
    with pytest.raises(ValueError, match="resume_from_checkpoint latest"):
        train_fr.prepare_output_dir(train_fr.parse_args([*common, "--output_dir", str(straight)]))


def verify_png(image: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 image, as stored in a .bin."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Robustness: nothing non-finite is saved; resume checks settings and data; torn log lines
# ---------------------------------------------------------------------------------------------
def fr_flags(tmp_path: Path, output: str, *extra: str) -> list[str]:
    real, synthetic = tmp_path / "real", tmp_path / "synthetic"
    if not real.exists():
        build_mixed_roots(tmp_path)
    return [
        "--data_dir", str(real), "--data_dir", str(synthetic), "--backbone", "r18",
        "--batch_size", "4", "--max_train_steps", "2", "--mixed_precision", "no",
        "--log_every", "1", "--checkpointing_steps", "1", "--checkpoints_total_limit", "0",
        "--dataloader_num_workers", "0", "--learning_rate", "0.01",
        "--output_dir", str(tmp_path / output), *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_fp16_on_the_cpu_trains_and_says_it_runs_in_fp32(tmp_path):
    done = run_script(*fr_flags(tmp_path, "fp16", "--mixed_precision", "fp16"), cwd=tmp_path)
    assert "accelerate runs --mixed_precision fp16 in fp32 on the CPU" in done.stderr
    assert (tmp_path / "fp16" / "backbone.pth").exists()


def test_a_non_finite_model_is_never_written(tmp_path):
    flags = fr_flags(tmp_path, "nan", "--learning_rate", "1e30", "--max_train_steps", "3")
    with pytest.raises(train_fr.runs.NonFiniteLossError, match="non-finite"):
        train_fr.main(train_fr.parse_args(flags))
    assert not (tmp_path / "nan" / "backbone.pth").exists()
    for checkpoint in (tmp_path / "nan").glob("checkpoint-*"):
        state = torch.load(checkpoint / "training_state.pt", weights_only=True)
        assert all(
            torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()
        )


@pytest.mark.parametrize(
    "change, words",
    [
        (["--learning_rate", "0.02"], "learning_rate: 0.01 -> 0.02"),
        (["--batch_size", "2"], "batch_size: 4 -> 2"),
        (["--seed", "9"], "seed: 0 -> 9"),
        (["--lr_milestones", "5", "9"], "lr_milestones"),
        (["--head", "cosface"], "head: 'adaface' -> 'cosface'"),
    ],
)
def test_resume_refuses_changed_settings(tmp_path, change, words):
    train_fr.main(train_fr.parse_args(fr_flags(tmp_path, "run", "--max_train_steps", "1")))
    resume = fr_flags(tmp_path, "run", "--resume_from_checkpoint", "latest", *change)
    with pytest.raises(ValueError, match="trained with other settings or data.*" + words):
        train_fr.main(train_fr.parse_args(resume))


def test_trim_log_drops_torn_and_non_utf8_lines_by_name(tmp_path, caplog):
    log = tmp_path / "train_log.jsonl"
    log.write_bytes(
        b'{"step": 1, "loss": 2.0}\n'
        b'{"step": 2, "note": "\xff\xfe"}\n'  # not UTF-8 (a disk error, another tool's write)
        b"\xc3\n"  # a multi-byte character cut in half
        b'{"step": 3, "loss": 1.0}\r\n'
        b"[1, 2]\n"
        b'{"step": 9, "loss": 0.5}\n'  # past the resumed step
        b'{"step": 4, "lo'  # a writer killed mid-line
    )
    with caplog.at_level("WARNING"):
        train_fr.trim_log(log, last_step=4)
    assert [r["step"] for r in read_log(log)] == [1, 3]
    assert "dropped 4 torn line(s)" in caplog.text and "xff" in caplog.text


def test_resume_refuses_other_images_and_survives_a_torn_log_line(tmp_path):
    train_fr.main(train_fr.parse_args(fr_flags(tmp_path, "run", "--max_train_steps", "1")))
    with (tmp_path / "run" / "train_log.jsonl").open("ab") as handle:
        handle.write(b'{"step": 1, "bad": "\xff"}\n')  # not UTF-8
        handle.write(b'{"step": 2, "lo')  # a writer killed mid-line
    resume = fr_flags(tmp_path, "run", "--resume_from_checkpoint", "latest")
    train_fr.main(train_fr.parse_args(resume))
    assert [r["step"] for r in read_log(tmp_path / "run" / "train_log.jsonl")] == [1, 2]

    save(pattern_face(1, 2), tmp_path / "real" / "bob" / "0.png")  # same name, new content
    more = fr_flags(tmp_path, "run", "--resume_from_checkpoint", "latest", "--max_train_steps", "3")
    with pytest.raises(ValueError, match="dataset_fingerprint"):
        train_fr.main(train_fr.parse_args(more))


# ---------------------------------------------------------------------------------------------
# The official protocol: lr plateau, early stop and selected weights on benchmark accuracy
# ---------------------------------------------------------------------------------------------
def write_constant_accuracy_bin(path: Path) -> Path:
    """10 pairs of an image with itself, all genuine: accuracy is 1.0 at every epoch, so the
    first check is the best and no later one improves on it (improvement is strict)."""
    faces = [pattern_face(7, i // 2) for i in range(20)]
    verify.write_bin(path, [verify_png(face) for face in faces], [True] * 10)
    return path


def protocol_flags(tmp_path: Path, output: str, *extra: str) -> list[str]:
    flags = fr_flags(tmp_path, output, "--num_epochs", "20", "--lr_scheduler", "benchmark")
    flags.remove("--max_train_steps")
    flags.remove("2")
    bin_path = write_constant_accuracy_bin(tmp_path / "lfw.bin")
    return [
        *flags, "--plateau_patience", "1", "--early_stopping_epochs", "3", "--select_best",
        "--eval_bin", str(bin_path), *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_official_protocol_decays_stops_and_selects_on_benchmark_accuracy(tmp_path):
    train_fr.main(train_fr.parse_args(protocol_flags(tmp_path, "run")))
    run = tmp_path / "run"

    log = read_log(run / "train_log.jsonl")  # one step per epoch (4 faces, batch 4)
    # best at epoch 0; epochs 1, 2 do not improve -> lr x0.1 after epoch 2 (patience 1);
    # epoch 3 is 3 epochs after the best -> stop, although 20 epochs were allowed
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["lr"] for r in log] == pytest.approx([0.01, 0.01, 0.01, 0.001])
    config = json.loads((run / "config.json").read_text())
    assert config["stopped_early"] and config["best_epoch"] == 0
    assert config["best_mean_accuracy"] == 1.0 and config["backbone_is"] == "best epoch"
    verifications = read_log(run / "verification_log.jsonl")
    assert [v["epoch"] for v in verifications] == [1, 2, 3, 4]  # after each epoch, none extra
    selected = torch.load(run / "backbone.pth", weights_only=True)
    epoch_0 = torch.load(run / "checkpoint-1" / "training_state.pt", weights_only=True)["model"]
    last = torch.load(run / "checkpoint-4" / "training_state.pt", weights_only=True)["model"]
    for key, value in selected.items():
        assert torch.equal(value, epoch_0[f"backbone.{key}"]), key
    assert not torch.equal(selected["conv1.weight"], last["backbone.conv1.weight"])

    # resumed from the middle, it selects and stops the same (the best weights travel along)
    resume = protocol_flags(tmp_path, "resumed", "--resume_from_checkpoint")
    resume += [str(run / "checkpoint-2"), "--prepared_dir", str(run / "prepared_faces")]
    train_fr.main(train_fr.parse_args(resume))
    again = torch.load(tmp_path / "resumed" / "backbone.pth", weights_only=True)
    assert all(torch.equal(value, again[key]) for key, value in selected.items())
    # a stopped run is finished; the sets that steer training may not change on resume
    latest = protocol_flags(tmp_path, "run", "--resume_from_checkpoint", "latest")
    train_fr.main(train_fr.parse_args(latest))
    assert len(read_log(run / "train_log.jsonl")) == 4
    other_bin = write_constant_accuracy_bin(tmp_path / "cfp_fp.bin")
    with pytest.raises(ValueError, match="eval_bins"):
        train_fr.main(train_fr.parse_args([*latest, "--eval_bin", str(other_bin)]))


def test_protocol_flags_need_a_benchmark(tmp_path):
    for flag in (["--select_best"], ["--early_stopping_epochs", "6"]):
        with pytest.raises(ValueError, match="pass --eval_bin"):
            train_fr.parse_args(fr_flags(tmp_path, "x", *flag))
    with pytest.raises(ValueError, match="pass --eval_bin"):
        train_fr.parse_args(fr_flags(tmp_path, "x", "--lr_scheduler", "benchmark"))


@pytest.mark.slow
def test_two_processes_follow_the_benchmark_alike_and_stop_together(tmp_path):
    """torchrun, 2 processes: rank 0 verifies, every rank steps its lr and stops on that result
    (a rank that missed the stop would wait forever at the next collective)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    flags = protocol_flags(tmp_path, "two", "--batch_size", "2")  # global batch 4: 1 step/epoch
    completed = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(SCRIPT), *flags],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    log = read_log(tmp_path / "two" / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["lr"] for r in log] == pytest.approx([0.01, 0.01, 0.01, 0.001])
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["stopped_early"] and config["best_epoch"] == 0
