"""README: its list of differences from the reference code is complete, its examples current."""

from __future__ import annotations

import re

from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def test_the_differences_list_names_every_known_difference():
    differences = section("Where this differs from the reference code").lower()
    for known in (
        "aligned crops",
        "every instance sample",
        "class images",
        "--num_class_images",
        "clamp",
        '"none"',
        "side-portrait coin",
        "per-image seeds",
        "batched lora",
        "packed training",
        "pyeer",
        "dinov2-large",
        "augmentation",
        "non-finite",
    ):
        assert known in differences, known


def test_examples_use_the_feature_model_dgm_eval_uses():
    assert "dinov2-base" not in README
    assert re.search(r"--feature_model facebook/dinov2-large", README)
