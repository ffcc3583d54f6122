"""The README's first command: demo.py runs the whole experiment end to end on embedded models."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

VARIANTS = ["dreambooth", "identity", "triplet"]


@pytest.mark.slow
def test_demo_compares_the_three_variants_in_one_report(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPO_ROOT / "demo.py"), f"--output_dir={out}"]
    subprocess.run(command, check=True, env=env, cwd=tmp_path, timeout=900)

    for variant in VARIANTS:
        identities = sorted(p.name for p in (out / "loras" / variant).iterdir() if p.is_dir())
        assert identities == ["person_0", "person_1"]
        for identity in identities:
            lora = out / "loras" / variant / identity / "pytorch_lora_weights.safetensors"
            assert lora.is_file()
            assert len(list((out / "generated" / variant / identity).glob("*.png"))) == 3
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert "random-weight models" in metrics["banner"]
    # dlib's real embedder tells the two real identities apart; random-weight SD makes no faces.
    assert metrics["identity"]["real_vs_real"]["real"]["eer"] == 0.0
    for variant in VARIANTS:
        assert "skipped" in metrics["identity"]["synthetic_vs_synthetic"][variant]
        assert metrics["grids"]["methods"][variant]["n_identities"] == 2
        curves = metrics["training"]["methods"][variant]["identities"]["person_0"]["tags"]
        assert curves["train/loss"]["n_points"] >= 10  # logged every 2 of the 40 steps
        assert metrics["quality"]["sets"][variant]["n_images"] == 2 * 3
        assert metrics["pose"]["sets"][variant]["n_images"] == 2 * 3
    assert (
        "train/triplet_loss"
        in metrics["training"]["methods"]["triplet"]["identities"]["person_0"]["tags"]
    )
    assert metrics["quality"]["sets"]["real"]["n"] == 8  # every real photo scored
    assert metrics["pose"]["sets"]["real"]["n_faces"] == 8
    page = (out / "report" / "report.html").read_text()
    assert page.index("random-weight models") < page.index("<h1")  # the banner comes first
    assert re.search(r"<h2>(.*?)</h2>", page).group(1) == "Summary (the paper's columns)"
    assert "EER within set (pyeer) ↓" in page and "CR-FIQA ↑" in page
    assert metrics["quality"]["setting"] == "paper" and metrics["quality"]["channel_order"] == "BGR"
    assert "not comparable with the paper" in page  # the demo's pose: the dlib-PnP fallback
    # 3 variants x 2 identities x (3 generated + 4 real) thumbnails, all embedded.
    assert len(re.findall(r'src="data:image/jpeg;base64,', page)) == 3 * 2 * (3 + 4)
    assert not re.search(r"https?://", page)
    # FR utility: a tiny model on the real faces, verified on a .bin cut from the same faces
    fr_utility = metrics["fr_utility"]
    assert fr_utility["benchmarks"] == ["demo_pairs"]
    real = fr_utility["settings"]["real"]
    assert real["num_faces"] == 8 and real["num_identities"] == 2
    assert real["accuracy"]["demo_pairs"]["pairs"] == 12 and 0 <= real["mean_accuracy"] <= 1
    for variant in VARIANTS:  # random SD makes no face to train on: a row saying so
        assert "every image was skipped" in fr_utility["settings"][f"synthetic_{variant}"]["failed"]
    assert "Face-recognition utility" in page and "<th>demo_pairs</th>" in page


def test_temps_of_a_demo_killed_during_set_up_are_removed_on_the_next_run(tmp_path):
    """A kill while a model is written leaves its temp (tens of MB); the next run deletes it,
    and nothing else in the folder."""
    import demo

    models = tmp_path / "models"
    models.mkdir()
    stale_file = models / ".arcface_r18_random.pth.abcd1234.tmp"
    stale_file.write_bytes(b"x" * 1000)
    stale_folder = models / ".tiny-sd.wxyz5678.tmp"
    (stale_folder / "unet").mkdir(parents=True)
    other = models / ".notes.txt.abcd1234.tmp"  # not one of the demo's models
    other.write_text("keep")
    paths = demo.prepare_embedded_models(models)
    assert not stale_file.exists() and not stale_folder.exists() and other.exists()
    assert all(path.exists() for path in paths.values())
