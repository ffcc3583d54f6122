"""architectures.py: the base model's family, prediction type and resolution come from its
configs, for tiny random models of every supported architecture and the real shapes."""

from __future__ import annotations

import json

import pytest
from tiny_sd import build_tiny_sd

import architectures
from architectures import SD1, SD2, SDXL, Architecture
from random_models import _split_name, _unet_config, _vae_config


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tiny", Architecture(SD2, "epsilon", 64)),
        ("tiny-sd15", Architecture(SD1, "epsilon", 64)),
        ("tiny-sd21-v", Architecture(SD2, "v_prediction", 64)),
        ("tiny-sdxl", Architecture(SDXL, "epsilon", 64, vae_force_upcast=True)),
    ],
)
def test_tiny_models_are_detected_from_their_saved_configs(name, expected, tmp_path):
    folder = build_tiny_sd(tmp_path / name, size=name)
    assert architectures.detect_architecture(str(folder)) == expected
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == expected.pipeline_class


@pytest.mark.parametrize(
    ("name", "family", "prediction_type", "resolution"),
    [
        ("sd15", SD1, "epsilon", 512),
        ("sd21", SD2, "epsilon", 512),
        ("sd21-v", SD2, "v_prediction", 768),
        ("sdxl", SDXL, "epsilon", 1024),
    ],
)
def test_the_real_shapes_give_the_real_architectures(name, family, prediction_type, resolution):
    base, tiny = _split_name(name)
    scheduler = {"prediction_type": "v_prediction" if base == "sd21-v" else "epsilon"}
    found = architectures.architecture_from_configs(
        _unet_config(base, tiny), scheduler, _vae_config(base, tiny)
    )
    assert (found.family, found.prediction_type, found.resolution) == (
        family,
        prediction_type,
        resolution,
    )
    assert found.vae_force_upcast == (family == SDXL)


def test_an_fp16_safe_sdxl_vae_is_decoded_in_its_own_dtype():
    unet, scheduler = _unet_config("sdxl", True), {"prediction_type": "epsilon"}
    vae = dict(_vae_config("sdxl", True), force_upcast=False)  # e.g. sdxl-vae-fp16-fix
    assert not architectures.architecture_from_configs(unet, scheduler, vae).vae_force_upcast


def test_unreadable_hub_configs_fall_back_to_the_papers_base(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "nobody/not-a-cached-model"
    assert architectures.detect_architecture(name) is None
    assert architectures.architecture_or_paper(name) == architectures.PAPER_ARCHITECTURE


def test_unknown_random_model_names_list_the_options():
    with pytest.raises(ValueError, match="tiny-sdxl"):
        _split_name("sd3")
