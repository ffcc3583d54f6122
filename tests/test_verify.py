"""Evaluation/verify.py: safe .bin reading, flip-sum embedding, insightface's 10-fold protocol."""

import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.model_selection import KFold

import arcface
import verify

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES_DIR = Path(importlib.util.find_spec("insightface").origin).parent / "data" / "images"


# ---------------------------------------------------------------------------------------------
# Independent reference: insightface's calculate_roc/calculate_accuracy written plainly
# ---------------------------------------------------------------------------------------------
def reference_ten_fold(distances, issame, num_folds=10):
    """Threshold loop per fold with sklearn's KFold, as insightface's verification.py does."""
    thresholds = np.arange(0, 4, 0.01)
    accuracies, chosen = [], []
    for train_set, test_set in KFold(n_splits=num_folds, shuffle=False).split(distances):
        train_acc = []
        for threshold in thresholds:
            predicted = distances[train_set] < threshold
            correct = np.sum(predicted == issame[train_set])
            train_acc.append(correct / len(train_set))
        best = thresholds[int(np.argmax(train_acc))]
        predicted = distances[test_set] < best
        accuracies.append(np.sum(predicted == issame[test_set]) / len(test_set))
        chosen.append(best)
    return np.array(accuracies), np.array(chosen)


def unit_pairs_with_distances(distances: np.ndarray) -> np.ndarray:
    """(N,) squared L2 distances in [0, 4] -> (2N, 2) unit vectors, pair i at that distance."""
    angles = np.arccos(1.0 - distances / 2.0)  # ||a - b||^2 = 2 - 2 cos(angle)
    offsets = np.random.default_rng(0).uniform(0, 2 * np.pi, len(distances))
    first = np.stack([np.cos(offsets), np.sin(offsets)], axis=1)
    second = np.stack([np.cos(offsets + angles), np.sin(offsets + angles)], axis=1)
    return np.stack([first, second], axis=1).reshape(-1, 2)


# ---------------------------------------------------------------------------------------------
# The 10-fold protocol
# ---------------------------------------------------------------------------------------------
def test_known_answer_k_pairs_misclassified_at_every_reasonable_threshold():
    """Genuine at d=0.505, impostors at 2.505, k genuine at 3.505: wrong for any t <= 2.505."""
    num_pairs, hard = 600, [3, 77, 150, 151, 420, 599]  # hard pairs fall in folds 0,1,2,2,7,9
    issame = np.arange(num_pairs) % 2 == 0
    issame[hard] = True
    distances = np.where(issame, 0.505, 2.505)
    distances[hard] = 3.505
    embeddings = unit_pairs_with_distances(distances)

    result = verify.evaluate_pairs(embeddings, issame)

    assert result.accuracy_mean == pytest.approx(1 - len(hard) / num_pairs, abs=1e-12)
    errors_per_fold = np.bincount(np.array(hard) // 60, minlength=10)
    np.testing.assert_allclose(result.fold_accuracies, 1 - errors_per_fold / 60, atol=1e-12)
    # first threshold above 0.505 that keeps every impostor out: 0.51
    np.testing.assert_allclose(result.fold_thresholds, 0.51, atol=1e-9)
    assert result.accuracy_std == pytest.approx(np.std(1 - errors_per_fold / 60), abs=1e-12)


def test_perfectly_separable_pairs_score_one():
    rng = np.random.default_rng(1)
    issame = rng.random(1000) < 0.5
    distances = np.where(issame, rng.uniform(0.0, 1.2, 1000), rng.uniform(1.3, 4.0, 1000))
    result = verify.ten_fold_accuracy(distances, issame)
    assert result.accuracy_mean == 1.0
    assert result.accuracy_std == 0.0


@pytest.mark.parametrize("num_pairs", [6000, 1234, 57])
def test_matches_independent_kfold_reference_on_random_embeddings(num_pairs):
    """Overlapping genuine/impostor distributions, uneven fold sizes included."""
    rng = np.random.default_rng(num_pairs)
    issame = rng.random(num_pairs) < 0.5
    base = rng.normal(size=(num_pairs, 64))
    noise_scale = np.where(issame, 0.8, 3.0)[:, None]
    other = base + noise_scale * rng.normal(size=(num_pairs, 64))
    embeddings = np.stack([base, other], axis=1).reshape(-1, 64)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    distances = np.sum((embeddings[0::2] - embeddings[1::2]) ** 2, axis=1)

    result = verify.evaluate_pairs(embeddings, issame)
    reference_acc, reference_thresholds = reference_ten_fold(distances, issame)

    np.testing.assert_allclose(result.fold_accuracies, reference_acc, atol=1e-12)
    np.testing.assert_allclose(result.fold_thresholds, reference_thresholds, atol=1e-12)
    assert result.accuracy_mean == pytest.approx(reference_acc.mean(), abs=1e-12)
    assert result.accuracy_std == pytest.approx(reference_acc.std(), abs=1e-12)
    assert 0.6 < result.accuracy_mean < 1.0  # a non-trivial set


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="2 per pair"):
        verify.evaluate_pairs(np.zeros((5, 3)), np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="folds"):
        verify.ten_fold_accuracy(np.zeros(5), np.ones(5, dtype=bool))


# ---------------------------------------------------------------------------------------------
# Embedding: image + horizontal flip, summed, L2-normalised
# ---------------------------------------------------------------------------------------------
class ColumnWeightedMeans(torch.nn.Module):
    """A fixed, flip-SENSITIVE 'backbone': channel means weighted by column index -> (B, 6)."""

    def forward(self, x):
        columns = torch.linspace(0.0, 1.0, x.shape[3])
        left_weighted = (x * columns).mean(dim=(2, 3))
        return torch.cat([x.mean(dim=(2, 3)) + 1.0, left_weighted], dim=1)


def test_embed_with_flip_sums_image_and_mirror_then_normalises():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    model = ColumnWeightedMeans()

    embeddings = verify.embed_with_flip(model, images, batch_size=2)

    pixels = images.astype(np.float64) / 127.5 - 1.0  # (x/255 - 0.5)/0.5, NHWC
    columns = np.linspace(0.0, 1.0, 112)

    def manual(p):  # p (N, H, W, 3)
        return np.concatenate(
            [p.mean(axis=(1, 2)) + 1.0, (p * columns[None, None, :, None]).mean(axis=(1, 2))], 1
        )

    summed = manual(pixels) + manual(pixels[:, :, ::-1, :])
    expected = summed / np.linalg.norm(summed, axis=1, keepdims=True)
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)
    assert not np.allclose(manual(pixels), manual(pixels[:, :, ::-1, :]))  # flip matters


# ---------------------------------------------------------------------------------------------
# .bin files: round trip, py2 layout, numpy variants, malicious pickles
# ---------------------------------------------------------------------------------------------
def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def solid_face(color, seed) -> np.ndarray:
    """(112, 112, 3) uint8: a colour with a little noise (the colour is the 'identity')."""
    noise = np.random.default_rng(seed).integers(-8, 9, (112, 112, 3))
    return np.clip(np.array(color)[None, None, :] + noise, 0, 255).astype(np.uint8)


def test_valid_bin_round_trips(tmp_path):
    tom = np.asarray(Image.open(IMAGES_DIR / "Tom_Hanks_54745.png").convert("RGB"))
    images = [tom, tom[:, ::-1].copy(), solid_face((200, 30, 30), 1), tom]
    issame = [True, False]
    path = tmp_path / "lfw.bin"

    verify.write_bin(path, [encode_png(i) for i in images], issame)
    pair_set = verify.load_bin(path)

    assert pair_set.name == "lfw"
    assert pair_set.images.dtype == np.uint8 and pair_set.images.shape == (4, 112, 112, 3)
    np.testing.assert_array_equal(pair_set.images, np.stack(images))  # PNG is lossless
    np.testing.assert_array_equal(pair_set.issame, issame)
    assert not list(tmp_path.glob("*.tmp"))


def test_jpeg_images_decode_like_pil_and_non_112_are_resized(tmp_path):
    photo = Image.open(IMAGES_DIR / "t1.jpg").convert("RGB")
    buffer = io.BytesIO()
    photo.crop((0, 0, 224, 224)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    path = tmp_path / "x.bin"
    verify.write_bin(path, [jpeg, jpeg], [True])
    pair_set = verify.load_bin(path)
    expected = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((112, 112), Image.BILINEAR)
    np.testing.assert_array_equal(pair_set.images[0], np.asarray(expected))


def test_python2_layout_with_byte_strings_loads(tmp_path):
    """insightface's released .bin files are Python 2 pickles: BINSTRING byte strings, NEWTRUE."""
    images = [encode_png(solid_face((10 * i, 90, 160), i)) for i in range(4)]
    body = b"\x80\x02]q\x00("  # PROTO 2, EMPTY_LIST, BINPUT 0, MARK
    for data in images:
        body += b"T" + len(data).to_bytes(4, "little") + data  # BINSTRING (py2 str)
    body += b"e]q\x01(\x88\x89e\x86q\x02."  # APPENDS, [True, False], TUPLE2, STOP
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(body)

    pair_set = verify.load_bin(path)
    np.testing.assert_array_equal(pair_set.issame, [True, False])
    np.testing.assert_array_equal(pair_set.images[3], solid_face((30, 90, 160), 3))


def test_protocol_2_python3_bytes_and_numpy_variants_load(tmp_path):
    images = [solid_face((50, 50, 200), i) for i in range(4)]
    encoded = [encode_png(i) for i in images]
    cases = {
        "p2.bin": pickle.dumps((encoded, [True, False]), protocol=2),  # _codecs.encode(latin1)
        "np_issame.bin": pickle.dumps((encoded, np.array([True, False]))),
        "np_bool_scalars.bin": pickle.dumps((encoded, [np.bool_(True), np.bool_(False)])),
        "np_images.bin": pickle.dumps((images, [True, False])),
    }
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        pair_set = verify.load_bin(tmp_path / name)
        np.testing.assert_array_equal(pair_set.images, np.stack(images), err_msg=name)
        np.testing.assert_array_equal(pair_set.issame, [True, False], err_msg=name)


class MarkerPayload:
    """Unpickling this would run a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvalPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


def test_the_payloads_do_run_under_plain_pickle(tmp_path):
    """Guards the next test: these payloads really create the marker when unpickled naively."""
    for payload_class in (MarkerPayload, EvalPayload):
        marker = tmp_path / f"{payload_class.__name__}.marker"
        pickle.loads(pickle.dumps(payload_class(marker)))  # the unsafe way, on purpose
        assert marker.exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("payload_class", [MarkerPayload, EvalPayload])
def test_malicious_pickle_is_rejected_before_running(tmp_path, protocol, payload_class):
    marker = tmp_path / "pwned"
    good = [encode_png(solid_face((0, 0, 0), 0))] * 2
    payloads = [
        (good, [payload_class(marker)]),  # hidden in issame
        ([payload_class(marker), good[0]], [True]),  # hidden among the images
        payload_class(marker),  # the whole file
    ]
    for index, payload in enumerate(payloads):
        path = tmp_path / f"evil{index}.bin"
        path.write_bytes(pickle.dumps(payload, protocol=protocol))
        with pytest.raises(verify.UnsafeBinError, match="refusing to load"):
            verify.load_bin(path)
        assert not marker.exists()


def test_codecs_encode_other_than_latin1_is_refused(tmp_path):
    """_codecs.encode is allowed only as Python 3 writes bytes (latin1)."""
    body = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R."
    path = tmp_path / "codec.bin"
    path.write_bytes(body)
    with pytest.raises(verify.UnsafeBinError):
        verify.load_bin(path)


def write_like_build_eval_pack(path: Path, faces: list[np.ndarray], issame: list[bool]) -> None:
    """Exactly as insightface's recognition/_tools_/build_eval_pack.py packs a set: RGB faces
    flipped to BGR, `_, s = cv2.imencode('.jpg', warped)`, the arrays appended as they are, and
    pickle.dump((bins, issame_list), f, protocol=pickle.HIGHEST_PROTOCOL) (5 on Python >= 3.8)."""
    import cv2

    bins = []
    for face in faces:
        warped = face[..., ::-1]  # to bgr
        _, s = cv2.imencode(".jpg", warped)
        bins.append(s)
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=pickle.HIGHEST_PROTOCOL)


def test_insightface_build_eval_pack_files_load_as_cv2_decodes_them(tmp_path):
    import cv2

    tom = np.asarray(Image.open(IMAGES_DIR / "Tom_Hanks_54745.png").convert("RGB"))
    faces = [tom, tom[:, ::-1].copy(), solid_face((200, 30, 30), 1), tom]
    path = tmp_path / "lfw.bin"
    write_like_build_eval_pack(path, faces, [True, False])
    assert pickle.HIGHEST_PROTOCOL >= 5 and path.read_bytes()[:2] == b"\x80\x05"
    assert b"_frombuffer" in path.read_bytes()  # numpy's protocol-5 path, not _reconstruct

    pair_set = verify.load_bin(path)

    bins, _ = pickle.loads(path.read_bytes())  # our own file: safe to read plainly here
    expected = np.stack([cv2.imdecode(s, cv2.IMREAD_COLOR)[..., ::-1] for s in bins])
    np.testing.assert_array_equal(pair_set.images, expected)  # what insightface's loader sees
    np.testing.assert_array_equal(pair_set.issame, [True, False])
    # the (L, 1) vectors of OpenCV < 5 and plain bytes decode alike
    old_layout = tmp_path / "old.bin"
    old_layout.write_bytes(pickle.dumps(([s.reshape(-1, 1) for s in bins], [True, False]), 5))
    np.testing.assert_array_equal(verify.load_bin(old_layout).images, expected)


def test_protocol_5_object_arrays_and_out_of_band_buffers_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    encoded = np.frombuffer(encode_png(solid_face((9, 9, 9), 0)), np.uint8)
    cases = {
        "evil_beside_arrays.bin": ([encoded, encoded], [MarkerPayload(marker)]),
        "object_array.bin": ([np.array([encoded, MarkerPayload(marker)], dtype=object)] * 2, [1]),
    }
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(pickle.dumps(payload, protocol=5))
        with pytest.raises(verify.UnsafeBinError, match="refusing"):
            verify.load_bin(tmp_path / name)
        assert not marker.exists()
    buffers = []
    stream = pickle.dumps(([encoded, encoded], [True]), protocol=5, buffer_callback=buffers.append)
    (tmp_path / "oob.bin").write_bytes(stream)
    assert buffers  # the payload really went out of band: it is not in the file
    with pytest.raises(ValueError, match="oob.bin.*out-of-band"):
        verify.load_bin(tmp_path / "oob.bin")


def test_numpy_names_off_the_allow_list_are_refused(tmp_path):
    """Only numpy's reconstruction helpers resolve; e.g. numpy.load (which can unpickle) does not,
    and _reconstruct builds plain ndarrays only."""
    for module, name in (("numpy", "load"), ("numpy.lib.npyio", "load"), ("numpy", "frombuffer")):
        body = b"\x80\x05\x8c" + bytes([len(module)]) + module.encode()
        body += b"\x8c" + bytes([len(name)]) + name.encode() + b"\x93."  # STACK_GLOBAL
        (tmp_path / "n.bin").write_bytes(body)
        with pytest.raises(verify.UnsafeBinError, match=f"refusing to load {module}.{name}"):
            verify.load_bin(tmp_path / "n.bin")
    # _reconstruct(numpy.dtype, ...): a subtype other than ndarray
    body = b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\ndtype\nK\x00\x85C\x01b\x87R."
    (tmp_path / "r.bin").write_bytes(body)
    with pytest.raises(verify.UnsafeBinError, match="reconstruct"):
        verify.load_bin(tmp_path / "r.bin")


def test_malformed_bins_are_clear_errors(tmp_path):
    encoded = [encode_png(solid_face((1, 2, 3), 0))]
    cases = {
        "odd_count.bin": pickle.dumps((encoded * 3, [True])),
        "not_pair.bin": pickle.dumps([encoded]),
        "issame_not_bool.bin": pickle.dumps((encoded * 2, ["yes"])),
        "not_image.bin": pickle.dumps(([b"not an image", encoded[0]], [True])),
        "truncated.bin": pickle.dumps((encoded * 2, [True]))[:50],
    }
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            verify.load_bin(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        verify.load_bin(tmp_path / "missing.bin")


# ---------------------------------------------------------------------------------------------
# End to end: a known-answer pair set through load_bin + evaluate_backbone, and the CLI
# ---------------------------------------------------------------------------------------------
class ChannelMeans(torch.nn.Module):
    """Flip-invariant 'backbone' that reads identity from colour: (B,3,H,W) -> (B,3) centred."""

    def forward(self, x):
        return x.mean(dim=(2, 3)) - x.mean(dim=(1, 2, 3))[:, None]


def write_colour_pairs(path: Path, num_pairs: int, swapped: list[int]) -> np.ndarray:
    """Same pairs share a colour, different pairs differ; `swapped` labels are flipped."""
    palette = [(220, 40, 40), (40, 220, 40), (40, 40, 220)]
    issame = np.arange(num_pairs) % 2 == 0
    images = []
    for i, same in enumerate(issame):
        first = palette[i % 3]
        second = first if same else palette[(i + 1) % 3]
        images += [encode_png(solid_face(first, 2 * i)), encode_png(solid_face(second, 2 * i + 1))]
    labels = issame.copy()
    labels[swapped] = ~labels[swapped]
    verify.write_bin(path, images, labels.tolist())
    return labels


def test_evaluate_backbone_on_a_known_answer_bin(tmp_path):
    path = tmp_path / "colours.bin"
    write_colour_pairs(path, num_pairs=60, swapped=[5, 33])
    result = verify.evaluate_backbone(ChannelMeans(), verify.load_bin(path), batch_size=16)
    assert result.accuracy_mean == pytest.approx(1 - 2 / 60)
    assert result.num_pairs == 60 and result.name == "colours"


@pytest.mark.slow
def test_cli_prints_table_and_writes_json(tmp_path):
    """Two sets through the script with a real (random) r18; 2 folds keep the sets tiny."""
    torch.manual_seed(0)
    backbone_path = tmp_path / "backbone.pth"
    torch.save(arcface.build_iresnet("r18").state_dict(), backbone_path)
    write_colour_pairs(tmp_path / "lfw.bin", num_pairs=4, swapped=[])
    write_colour_pairs(tmp_path / "cfp_fp.bin", num_pairs=4, swapped=[1])
    out = tmp_path / "results" / "verification.json"
    command = [
        sys.executable, str(REPO_ROOT / "Evaluation" / "verify.py"),
        "--backbone", str(backbone_path),
        "--bin", str(tmp_path / "lfw.bin"), "--bin", str(tmp_path / "cfp_fp.bin"),
        "--out", str(out), "--batch_size", "8", "--device", "cpu", "--num_folds", "2",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    results = json.loads(out.read_text())
    assert set(results["sets"]) == {"lfw", "cfp_fp"}
    assert results["sets"]["cfp_fp"]["num_pairs"] == 4
    assert len(results["sets"]["cfp_fp"]["fold_accuracies"]) == 2
    accuracies = [results["sets"][n]["accuracy_mean"] for n in ("lfw", "cfp_fp")]
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    assert results["mean_accuracy"] == pytest.approx(np.mean(accuracies))
    table = done.stdout
    assert "lfw" in table and "cfp_fp" in table
    assert f"{100 * results['mean_accuracy']:.2f}" in table.splitlines()[-1]


def test_cli_rejects_duplicate_set_names(tmp_path):
    with pytest.raises(SystemExit):
        verify.parse_args(["--backbone", "b.pth", "--bin", "a/lfw.bin", "--bin", "b/lfw.bin"])
