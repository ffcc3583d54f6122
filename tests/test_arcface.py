"""arcface.py: IResNet checkpoints, ONNX path, alignment, real face detection (dlib), embedding."""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from face_photos import rgb, tom_hanks_canvas
from safetensors.torch import save_file

import arcface
import datasets
import faces


# ---------------------------------------------------------------------------------------------
# Independent description of insightface arcface_torch IResNet checkpoints
# ---------------------------------------------------------------------------------------------
def _bn_shapes(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of one BatchNorm in a torch state dict."""
    return {
        f"{prefix}.weight": (channels,),
        f"{prefix}.bias": (channels,),
        f"{prefix}.running_mean": (channels,),
        f"{prefix}.running_var": (channels,),
        f"{prefix}.num_batches_tracked": (),
    }


def insightface_iresnet_shapes(
    blocks_per_stage: list[int], num_features: int = 512
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an arcface_torch backbone.pth (recognition/arcface_torch/backbones)."""
    shapes = {"conv1.weight": (64, 3, 3, 3), **_bn_shapes("bn1", 64), "prelu.weight": (64,)}
    in_channels = 64
    for stage, (blocks, planes) in enumerate(
        zip(blocks_per_stage, (64, 128, 256, 512), strict=True), 1
    ):
        for index in range(blocks):
            prefix = f"layer{stage}.{index}"
            block_in = in_channels if index == 0 else planes
            shapes.update(_bn_shapes(f"{prefix}.bn1", block_in))
            shapes[f"{prefix}.conv1.weight"] = (planes, block_in, 3, 3)
            shapes.update(_bn_shapes(f"{prefix}.bn2", planes))
            shapes[f"{prefix}.prelu.weight"] = (planes,)
            shapes[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            shapes.update(_bn_shapes(f"{prefix}.bn3", planes))
            if index == 0:  # every stage starts with a stride-2 block, so it has a shortcut conv
                shapes[f"{prefix}.downsample.0.weight"] = (planes, block_in, 1, 1)
                shapes.update(_bn_shapes(f"{prefix}.downsample.1", planes))
        in_channels = planes
    shapes.update(_bn_shapes("bn2", 512))
    shapes["fc.weight"] = (num_features, 512 * 7 * 7)
    shapes["fc.bias"] = (num_features,)
    shapes.update(_bn_shapes("features", num_features))
    return shapes


def synthetic_state_dict(
    shapes: dict[str, tuple[int, ...]], seed: int = 0, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Random tensors with the given shapes; valid BN statistics; features.weight fixed at 1."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if device == "meta":
            dtype = torch.long if key.endswith("num_batches_tracked") else torch.float32
            state[key] = torch.empty(shape, dtype=dtype, device="meta")
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        elif key == "features.weight":
            state[key] = torch.ones(shape)
        elif len(shape) >= 2:  # conv / fc weights, unit gain so the input still matters at the end
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.randn(shape, generator=generator) / fan_in**0.5
        elif "prelu" in key:
            state[key] = 0.25 + 0.05 * torch.randn(shape, generator=generator)
        elif key.endswith(".weight"):  # BatchNorm scales
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:  # BatchNorm shifts and running means, fc bias
            state[key] = 0.1 * torch.randn(shape, generator=generator)
    return state


def reference_iresnet_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """arcface_torch IResNet forward written functionally from the state dict (no nn.Module)."""

    def bn(t: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.batch_norm(
            t,
            state[f"{prefix}.running_mean"],
            state[f"{prefix}.running_var"],
            state[f"{prefix}.weight"],
            state[f"{prefix}.bias"],
            training=False,
            eps=1e-5,
        )

    x = F.prelu(bn(F.conv2d(x, state["conv1.weight"], padding=1), "bn1"), state["prelu.weight"])
    for stage in range(1, 5):
        index = 0
        while f"layer{stage}.{index}.conv1.weight" in state:
            p = f"layer{stage}.{index}"
            stride = 2 if index == 0 else 1
            out = F.conv2d(bn(x, f"{p}.bn1"), state[f"{p}.conv1.weight"], padding=1)
            out = F.prelu(bn(out, f"{p}.bn2"), state[f"{p}.prelu.weight"])
            out = bn(
                F.conv2d(out, state[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn3"
            )
            shortcut = x
            if f"{p}.downsample.0.weight" in state:
                shortcut = bn(
                    F.conv2d(x, state[f"{p}.downsample.0.weight"], stride=stride),
                    f"{p}.downsample.1",
                )
            x = out + shortcut
            index += 1
    x = torch.flatten(bn(x, "bn2"), 1)
    return bn(F.linear(x, state["fc.weight"], state["fc.bias"]), "features")


@pytest.fixture(scope="module")
def r18_state() -> dict[str, torch.Tensor]:
    return synthetic_state_dict(insightface_iresnet_shapes(arcface.IRESNET_LAYERS["r18"]), seed=1)


@pytest.fixture(scope="module")
def r18_checkpoint(tmp_path_factory, r18_state) -> Path:
    path = tmp_path_factory.mktemp("r18") / "backbone.pth"
    torch.save(r18_state, path)
    return path


@pytest.fixture(scope="module")
def r18_encoder(r18_checkpoint) -> arcface.ArcFaceEncoder:
    return arcface.load_arcface(r18_checkpoint)


@pytest.fixture(scope="module")
def dlib_detector() -> faces.DlibFaceDetector:
    return faces.DlibFaceDetector()


# ---------------------------------------------------------------------------------------------
# IResNet checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(arcface.IRESNET_LAYERS))
def test_insightface_keys_and_shapes_load_strictly_into_each_depth(name):
    layers = arcface.IRESNET_LAYERS[name]
    shapes = insightface_iresnet_shapes(layers)
    meta_state = synthetic_state_dict(shapes, device="meta")
    assert arcface.infer_iresnet_depth(meta_state) == name
    with torch.device("meta"):
        model = arcface.build_iresnet(name)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    model.load_state_dict(meta_state, strict=True, assign=True)
    assert not model.features.weight.requires_grad


@pytest.mark.parametrize("name", ["r34", "r50"])
def test_real_tensors_load_into_deeper_models(name):
    state = synthetic_state_dict(insightface_iresnet_shapes(arcface.IRESNET_LAYERS[name]), seed=2)
    model = arcface.iresnet_from_state_dict(state)
    assert not model.training
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == arcface.IRESNET_LAYERS[name]
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


def test_r18_forward_matches_functional_reference_and_round_trips(
    r18_state, r18_checkpoint, r18_encoder
):
    assert isinstance(r18_encoder.backbone, arcface.IResNet) and not r18_encoder.backbone.training
    x = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        raw = r18_encoder.backbone(x)
        torch.testing.assert_close(raw, reference_iresnet_forward(r18_state, x))
    before = r18_encoder.embed(x)
    torch.testing.assert_close(before, F.normalize(raw, dim=1))
    torch.testing.assert_close(before.norm(dim=1), torch.ones(1))
    resaved = r18_checkpoint.parent / "resaved.safetensors"
    save_file(r18_encoder.backbone.state_dict(), str(resaved))
    after = arcface.load_arcface(resaved).embed(x)
    assert torch.equal(before, after)


def test_wrapped_ddp_checkpoint_without_step_counters_loads(tmp_path, r18_state):
    ddp = {f"module.{k}": v for k, v in r18_state.items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict_backbone": ddp, "epoch": 3}, tmp_path / "checkpoint_gpu_0.pt")
    model = arcface.load_iresnet(tmp_path / "checkpoint_gpu_0.pt")
    assert torch.equal(model.fc.weight, r18_state["fc.weight"])


def test_encoder_is_frozen_and_named_by_content(tmp_path, r18_checkpoint, r18_encoder):
    assert all(not p.requires_grad for p in r18_encoder.parameters())
    r18_encoder.train()
    assert not r18_encoder.training and not r18_encoder.backbone.training
    assert r18_encoder.name == f"backbone-{arcface.file_sha256(r18_checkpoint)[:12]}"
    content = r18_checkpoint.read_bytes()
    (tmp_path / "backbone.pth").write_bytes(content)  # same bytes elsewhere: same id
    assert arcface.weights_name(tmp_path / "backbone.pth") == r18_encoder.name
    (tmp_path / "backbone.pth").write_bytes(b"\x00" + content[1:])
    assert arcface.weights_name(tmp_path / "backbone.pth") != r18_encoder.name
    faces = torch.rand(1, 3, 112, 112, requires_grad=True)
    r18_encoder(faces * 2 - 1).sum().backward()
    assert faces.grad is not None and faces.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(B, 3, 112, 112\)"):
        r18_encoder(torch.zeros(1, 3, 128, 128))


def test_wrong_architecture_errors_name_the_problem(tmp_path, r18_state):
    torch.save(torch.nn.Linear(4, 2).state_dict(), tmp_path / "linear.pth")
    with pytest.raises(ValueError, match=r"linear\.pth is not an arcface_torch IResNet checkpoint"):
        arcface.load_iresnet(tmp_path / "linear.pth")
    resnet_like = {k: v for k, v in r18_state.items() if not k.startswith(("prelu", "features"))}
    missing = {k: v for k, v in r18_state.items() if k != "layer2.1.conv1.weight"}
    extra = dict(r18_state, **{"head.kernel": torch.zeros(3)})
    wrong_fc = dict(r18_state, **{"fc.weight": torch.zeros(512, 512 * 8 * 8)})
    odd_depth = dict(r18_state, **{"layer3.2.conv1.weight": torch.zeros(256, 256, 3, 3)})
    for state, message in [
        (resnet_like, r"missing \['prelu.weight', 'features.weight'"),
        (missing, r"missing keys: layer2\.1\.conv1\.weight"),
        (extra, r"unexpected keys: head\.kernel"),
        (wrong_fc, r"shape mismatch: fc\.weight: checkpoint \(512, 32768\) vs model"),
        (odd_depth, r"\[2, 2, 3, 2\] is not a known depth"),
    ]:
        with pytest.raises(ValueError, match=message):
            arcface.iresnet_from_state_dict(state)
    torch.save(torch.nn.PReLU(3), tmp_path / "pickled_module.pth")
    with pytest.raises(ValueError, match="not a plain tensor checkpoint"):
        arcface.load_iresnet(tmp_path / "pickled_module.pth")


def test_truncated_or_missing_files_give_clear_errors(tmp_path, r18_checkpoint):
    data = r18_checkpoint.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pth.*truncated or corrupt"):
        arcface.load_arcface(tmp_path / "cut.pth")
    save_file({"conv1.weight": torch.ones(64, 3, 3, 3)}, str(tmp_path / "full.safetensors"))
    blob = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors.*truncated or corrupt"):
        arcface.load_arcface(tmp_path / "cut.safetensors")
    (tmp_path / "cut.onnx").write_bytes(b"\x08\x07\x12\x07pytorch\x1a" + data[:1000])
    with pytest.raises(ValueError, match=r"cut\.onnx"):
        arcface.load_arcface(tmp_path / "cut.onnx")
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        arcface.load_arcface(tmp_path / "absent.pth")
    with pytest.raises(ValueError, match=r"\.onnx"):
        arcface.load_arcface(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="options"):
        arcface.build_iresnet("r101")


# ---------------------------------------------------------------------------------------------
# ONNX recogniser (the format insightface packs ship)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def r18_onnx(tmp_path_factory, r18_checkpoint) -> Path:
    model = arcface.load_iresnet(r18_checkpoint)  # a copy: some weights are changed below
    # Equal-valued weights get deduplicated into Identity nodes by the exporter.
    model.prelu.weight.data.fill_(0.25)
    model.layer1[0].prelu.weight.data.fill_(0.25)
    path = tmp_path_factory.mktemp("onnx") / "w600k_test.onnx"
    torch.onnx.export(
        model,
        torch.zeros(1, 3, 112, 112),
        str(path),
        opset_version=11,
        dynamo=False,
        input_names=["input.1"],
        output_names=["embedding"],
        dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}},
    )
    torch.save(model.state_dict(), path.with_suffix(".pth"))
    return path


@pytest.fixture(scope="module")
def onnx_encoder(r18_onnx) -> arcface.ArcFaceEncoder:
    return arcface.load_arcface(r18_onnx)


def test_onnx_recogniser_is_differentiable_and_matches_torch(r18_onnx, onnx_encoder):
    # The torchvision placeholder lives in sys.modules only while onnx2torch is imported.
    assert "torchvision" not in sys.modules or hasattr(sys.modules["torchvision"], "__file__")
    torch_encoder = arcface.load_arcface(r18_onnx.with_suffix(".pth"))
    assert not onnx_encoder.backbone.training and not onnx_encoder.expects_pixels
    # The exporter turned the equal PReLU weights into Identity nodes, which load_arcface inlines.
    assert any(node.op_type == "Identity" for node in onnx.load(str(r18_onnx)).graph.node)
    assert all(not p.requires_grad for p in onnx_encoder.parameters())
    faces = (
        torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ).requires_grad_()
    embeddings = onnx_encoder(faces)
    torch.testing.assert_close(embeddings, torch_encoder(faces), rtol=1e-4, atol=1e-5)
    embeddings[:, 0].sum().backward()
    assert (
        faces.grad is not None and torch.isfinite(faces.grad).all() and faces.grad.abs().sum() > 0
    )
    if "torchvision" not in sys.modules:  # the NMS converter holds the placeholder: fails loudly
        nms_module = sys.modules["onnx2torch.node_converters.nms"]
        with pytest.raises(RuntimeError, match="torchvision"):
            nms_module.torchvision.ops.nms(None, None, 0.5)


def test_insightface_loads_the_same_onnx_and_agrees(r18_onnx, onnx_encoder, dlib_detector):
    from insightface.model_zoo import get_model

    recogniser = get_model(str(r18_onnx))
    # insightface feeds (x - 127.5) / 127.5 of the image after swapping BGR -> RGB (swapRB=True),
    # i.e. exactly images_to_arcface_input of the RGB image.
    assert (recogniser.input_mean, recogniser.input_std) == (127.5, 127.5)
    group = rgb("t1.jpg")  # colour (Tom_Hanks_54745.png is grey, blind to channel order)
    aligned = faces.align_face(group, dlib_detector.detect_landmarks(group))
    theirs = recogniser.get_feat(np.ascontiguousarray(aligned[..., ::-1]))[0]
    ours = onnx_encoder.embed(arcface.images_to_arcface_input(aligned[None]))
    cosine = float(ours[0] @ torch.from_numpy(theirs / np.linalg.norm(theirs)))
    assert cosine > 0.99999
    # Channel order matters: handing insightface the RGB array instead gives another embedding.
    swapped = recogniser.get_feat(aligned)[0]
    assert float(ours[0] @ torch.from_numpy(swapped / np.linalg.norm(swapped))) < 0.9999


def test_onnx_errors_are_clear(tmp_path, monkeypatch):
    torch.onnx.export(
        torch.nn.Conv2d(3, 4, 1), torch.zeros(1, 3, 64, 64), str(tmp_path / "conv.onnx"),
        opset_version=11, dynamo=False, output_names=["out"],
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"conv\.onnx takes input of shape \[1, 3, 64, 64\]"):
        arcface.load_arcface(tmp_path / "conv.onnx")
    monkeypatch.setitem(sys.modules, "onnx2torch", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install --no-deps onnx2torch"):
        arcface._import_onnx2torch()


# ---------------------------------------------------------------------------------------------
# Input handling and alignment
# ---------------------------------------------------------------------------------------------
def test_images_to_arcface_input_scales_rgb_to_unit_range():
    images = np.zeros((2, 112, 112, 3), dtype=np.uint8)
    images[0, :, :, 0] = 255
    images[1, 5, 7] = (0, 51, 204)
    x = arcface.images_to_arcface_input(images)
    assert x.shape == (2, 3, 112, 112) and x.dtype == torch.float32
    assert x[0, 0].eq(1).all() and x[0, 1:].eq(-1).all()
    torch.testing.assert_close(x[1, :, 5, 7], torch.tensor([0, 51, 204]) / 127.5 - 1)
    torch.testing.assert_close(arcface.images_to_arcface_input(torch.from_numpy(images)), x)
    with pytest.raises(ValueError, match="uint8"):
        arcface.images_to_arcface_input(images.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(B, 112, 112, 3\)"):
        arcface.images_to_arcface_input(images[0])


# ---------------------------------------------------------------------------------------------
# Detect + align + embed
# ---------------------------------------------------------------------------------------------
def test_embed_face_images_marks_images_without_faces(dlib_detector, r18_encoder):
    canvas = tom_hanks_canvas()[0]
    blank = np.full((120, 150, 3), 200, dtype=np.uint8)
    group = rgb("t1.jpg")
    embeddings, found = datasets.annotate_images(
        [canvas, blank, group], dlib_detector, r18_encoder, batch_size=1
    )  # batch_size 1: the two faces go through separate batches
    assert embeddings.shape == (3, 512) and embeddings.dtype == np.float32
    assert found.tolist() == [True, False, True]
    assert not embeddings[1].any()
    crops = [faces.align_face(im, dlib_detector.detect_landmarks(im)) for im in (canvas, group)]
    with torch.no_grad():
        expected = r18_encoder.embed(arcface.images_to_arcface_input(np.stack(crops))).numpy()
    np.testing.assert_allclose(embeddings[[0, 2]], expected, atol=1e-5)
