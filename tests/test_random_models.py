"""random_models.py's command line: a random pipeline folder the scripts load."""

import pytest

import random_models
from architectures import SDXL, detect_architecture
from sampling import load_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_help_lists_every_size():
    text = random_models.build_parser().format_help()
    for name in random_models.RANDOM_MODEL_NAMES:
        assert name in text


def test_cli_builds_a_loadable_tiny_sdxl(tmp_path, capsys):
    folder = random_models.main(["--size", "tiny-sdxl", str(tmp_path / "sdxl")])
    assert "tiny-sdxl" in capsys.readouterr().out
    assert detect_architecture(str(folder)).family == SDXL
    pipeline = load_pipeline(str(folder))
    assert type(pipeline).__name__ == "StableDiffusionXLPipeline"


def test_cli_refuses_a_folder_with_files(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty"):
        random_models.main(["--size", "tiny", str(tmp_path)])
    assert (tmp_path / "keep.txt").read_text() == "mine"
