"""Bad input on the command line ends in one clear `error:` line, never a Python traceback."""

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, fake_base_model


def run_script(script: str, *arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPO_ROOT / script), *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(
    ("script", "arguments", "message"),
    [
        (
            "inference_ID-Booth.py",
            [
                "--lora_dir={tmp}/missing_identity",
                "--output_dir={tmp}/out",
                "--pretrained_model_name_or_path={tmp}/sd",  # a stand-in pipeline folder
            ],
            "missing_identity",
        ),
        (
            "Evaluation/evaluate.py",
            ["--generated=method={tmp}/missing_set", "--embedder=dlib", "--out={tmp}/report"],
            "missing_set",
        ),
        (
            "Evaluation/verify.py",
            ["--backbone={tmp}/backbone.pth", "--bin={tmp}/lfw.bin"],
            "backbone.pth",
        ),
        (
            "Evaluation/train_fr.py",
            ["--data_dir={tmp}/empty", "--output_dir={tmp}/fr", "--mixed_precision=no"],
            "empty",
        ),
    ],
)
@pytest.mark.slow
def test_bad_input_prints_one_error_line_without_traceback(tmp_path, script, arguments, message):
    (tmp_path / "empty").mkdir()
    fake_base_model(tmp_path / "sd")
    result = run_script(script, *(argument.format(tmp=tmp_path) for argument in arguments))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert "error:" in last_line and message in last_line, result.stderr[-2000:]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from random_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("base") / "sd")


def faceless_identity(root):
    """An identity folder whose only photo is noise: readable, large enough, no face."""
    import numpy as np
    from PIL import Image

    folder = root / "identity"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "noise.png")
    return folder


@pytest.mark.slow
def test_training_base_model_without_weights_is_named(tmp_path, tiny_base):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    for weights in (base / "unet").glob("*.safetensors"):
        weights.unlink()
    result = run_script(
        "train_ID-Booth.py",
        f"--pretrained_model_name_or_path={base}",
        f"--instance_data_dir={faceless_identity(tmp_path)}",
        "--loss=dreambooth",
        "--no-with_prior_preservation",
        f"--output_dir={tmp_path / 'out'}",
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "unet/ weights" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_training_identity_without_a_face_is_one_error_line(tmp_path, tiny_base):
    import torch

    from arcface import build_iresnet

    arcface_path = tmp_path / "arcface.pth"
    torch.save(build_iresnet("r18").state_dict(), arcface_path)
    result = run_script(
        "train_ID-Booth.py",
        f"--pretrained_model_name_or_path={tiny_base}",
        f"--instance_data_dir={faceless_identity(tmp_path)}",
        f"--arcface_weights={arcface_path}",
        "--face_detector=dlib",
        "--loss=identity",
        "--no-with_prior_preservation",
        "--resolution=64",
        f"--output_dir={tmp_path / 'out'}",
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("train_ID-Booth.py: error:") and "noise.png" in last_line


# ----------------------------------------------------------- broken inputs, in one line each


def _script(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cli_{path.stem}".replace("-", "_"), path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def one_line_error(program: str, module, argv: list[str]) -> str:
    """Run a script's main as its __main__ does (runs.run_cli) and return its one error line."""
    import runs

    with pytest.raises(SystemExit) as stop:
        runs.run_cli(program, lambda: module.parse_args(argv), module.main, errors=(Exception,))
    message = stop.value.code
    assert isinstance(message, str) and "\n" not in message, message
    assert message.startswith(f"{program}: error: "), message
    return message


def break_weights(base, part: str, kind: str) -> None:
    """Replace a pipeline part's weights by a truncated safetensors file or a garbage .bin."""
    folder = base / part
    for weights in [*folder.glob("*.safetensors"), *folder.glob("*.bin")]:
        data = weights.read_bytes()
        weights.unlink()
    if kind == "truncated safetensors":
        name = (
            "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
        )
        (folder / name).write_bytes(data[: len(data) // 3])
    else:
        name = "pytorch_model.bin" if part == "text_encoder" else "diffusion_pytorch_model.bin"
        (folder / name).write_bytes(b"garbage, not a pickle" * 20)


@pytest.mark.parametrize("kind", ["truncated safetensors", "garbage bin"])
@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
def test_broken_weights_of_any_pipeline_part_are_one_line(tmp_path, tiny_base, part, kind):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    break_weights(base, part, kind)
    lora = tmp_path / "loras" / "ID_a"
    lora.mkdir(parents=True)
    generation = _script(REPO_ROOT / "inference_ID-Booth.py")
    argv = [f"--pretrained_model_name_or_path={base}", f"--lora_dir={lora}"]
    argv += [f"--output_dir={tmp_path / 'out'}", "--prompt_template=photo of sks person"]
    argv += ["--prompt_template_no_background=photo of sks person"]
    message = one_line_error("inference_ID-Booth.py", generation, argv)
    assert "could not load" in message and str(base) in message
    training = _script(REPO_ROOT / "train_ID-Booth.py")
    argv = [f"--pretrained_model_name_or_path={base}", "--loss=dreambooth"]
    argv += [f"--instance_data_dir={faceless_identity(tmp_path)}", "--no-with_prior_preservation"]
    argv += [f"--output_dir={tmp_path / 'train'}", "--resolution=64", "--report_to=none"]
    message = one_line_error("train_ID-Booth.py", training, argv)
    assert "could not load" in message and str(base) in message


def _conv_net_onnx(path, output_channels_first: bool) -> None:
    """An ONNX graph with a 112x112 image input that is not a recogniser (image output)."""
    import torch

    net = torch.nn.Conv2d(3, 2, 3, padding=1)
    torch.onnx.export(
        net, torch.zeros(1, 3, 112, 112), str(path), input_names=["image"],
        output_names=["mask"], dynamo=False, opset_version=11,
    )  # fmt: skip


@pytest.mark.parametrize("onnx_file", ["empty", "segmentation net"])
def test_an_empty_or_non_recogniser_onnx_is_one_line(tmp_path, tiny_base, onnx_file):
    weights = tmp_path / "model.onnx"
    if onnx_file == "empty":
        weights.write_bytes(b"")
    else:
        _conv_net_onnx(weights, True)
    training = _script(REPO_ROOT / "train_ID-Booth.py")
    argv = [f"--pretrained_model_name_or_path={tiny_base}", "--loss=identity"]
    argv += [f"--instance_data_dir={faceless_identity(tmp_path)}", "--no-with_prior_preservation"]
    argv += [f"--arcface_weights={weights}", "--face_detector=dlib", "--resolution=64"]
    argv += [f"--output_dir={tmp_path / 'out'}", "--report_to=none"]
    message = one_line_error("train_ID-Booth.py", training, argv)
    assert "model.onnx" in message and ("recogniser" in message or "ONNX" in message)
    (tmp_path / "set").mkdir()
    faceless_identity(tmp_path / "set")  # an image, so the run gets to the recogniser
    evaluation = _script(REPO_ROOT / "Evaluation" / "evaluate.py")
    argv = [f"--generated={tmp_path / 'set'}", f"--arcface_weights={weights}"]
    argv += ["--face_detector=dlib", f"--out={tmp_path / 'report'}"]
    message = one_line_error("evaluate.py", evaluation, argv)
    assert "model.onnx" in message


def test_attribute_csvs_with_a_bom_work_and_with_extra_fields_are_one_line(tmp_path):
    import datasets

    with_bom = tmp_path / "bom.csv"
    with_bom.write_bytes("identity,gender\nID_a,male\n".encode("utf-8-sig"))
    assert datasets.load_identity_attributes(with_bom)["ID_a"]["gender"] == "male"
    extra = tmp_path / "extra.csv"
    extra.write_text("identity,gender\nID_a,male,tall\n")
    lora = tmp_path / "loras" / "ID_a"
    lora.mkdir(parents=True)
    generation = _script(REPO_ROOT / "inference_ID-Booth.py")
    argv = [f"--lora_dir={lora}", f"--output_dir={tmp_path / 'out'}"]
    argv += [f"--identity_attributes={extra}"]
    argv += [f"--pretrained_model_name_or_path={fake_base_model(tmp_path / 'sd')}"]
    message = one_line_error("inference_ID-Booth.py", generation, argv)
    assert "line 2 has more fields than the header" in message


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_no_temp(
    tmp_path, tiny_base, monkeypatch
):
    import errno

    import torch

    training = _script(REPO_ROOT / "train_ID-Booth.py")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training.torch, "save", disk_full)
    photos = tmp_path / "photos"
    photos.mkdir()
    pixels = torch.rand(3, 96, 96).mul(255).byte().permute(1, 2, 0).numpy()
    from PIL import Image

    Image.fromarray(pixels).save(photos / "p.png")
    argv = [f"--pretrained_model_name_or_path={tiny_base}", "--loss=dreambooth"]
    argv += [f"--instance_data_dir={photos}", "--no-with_prior_preservation", "--resolution=64"]
    argv += ["--max_train_steps=2", "--checkpointing_steps=1", "--validation_prompt="]
    argv += [f"--output_dir={tmp_path / 'out'}", "--report_to=none", "--mixed_precision=no"]
    message = one_line_error("train_ID-Booth.py", training, argv)
    assert "No space left on device" in message
    assert not list((tmp_path / "out").glob("checkpoint-*"))
    assert not list((tmp_path / "out").glob(".*"))  # no temp folder either
