"""The Evaluation/ notebooks run headless (nbclient) on tiny real-face data, call the shared
functions instead of copying logic, and are stored without outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from evaluation_data import build_tiny_dinov2, real_face_crops, write_identity_folders
from nbclient import NotebookClient

EVALUATION_DIR = Path(__file__).resolve().parents[1] / "Evaluation"
NOTEBOOKS = (
    "identity_analysis.ipynb",
    "diversity_fidelity.ipynb",
    "quality_analysis.ipynb",
    "pose_analysis.ipynb",
)
KERNEL_NAME = "id-booth-tests"


@pytest.fixture(scope="module")
def notebook_env(tmp_path_factory) -> dict[str, str]:
    """Tiny data + a kernel spec running this very interpreter (not whatever `python` is)."""
    root = tmp_path_factory.mktemp("notebook_data")
    crops = real_face_crops()
    names = sorted(crops)[:3]
    write_identity_folders(root / "real", crops, names, 2)
    write_identity_folders(root / "gen", crops, names, 2)
    build_tiny_dinov2(root / "dino")
    kernel_dir = root / "jupyter" / "kernels" / KERNEL_NAME
    kernel_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ID-Booth tests",
        "language": "python",
    }
    (kernel_dir / "kernel.json").write_text(json.dumps(spec))
    return {
        "JUPYTER_PATH": str(root / "jupyter"),
        "IDB_EVALUATION_DIR": str(EVALUATION_DIR),
        "IDB_GENERATED": f"ID-Booth={root / 'gen'}",
        "IDB_REAL": str(root / "real"),
        "IDB_OUT": str(root / "out"),
        "IDB_EMBEDDER": "dlib",
        "IDB_FEATURE_MODEL": str(root / "dino"),
        "IDB_FEATURE_IMAGE_SIZE": "56",
        "IDB_KD_SUBSETS": "5",
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
    }


def run_notebook(name: str, env: dict[str, str], monkeypatch) -> str:
    """Execute a notebook in a fresh kernel; return all its text/html output joined."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(EVALUATION_DIR / name, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name=KERNEL_NAME,
        timeout=240,
        resources={"metadata": {"path": str(EVALUATION_DIR)}},
    )
    client.execute()  # raises CellExecutionError with the traceback if a cell fails
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", ""))
            texts.extend(str(v) for k, v in output.get("data", {}).items() if k != "image/png")
    return "\n".join(texts)


@pytest.mark.slow
def test_identity_notebook_runs_on_real_faces(notebook_env, monkeypatch):
    output = run_notebook("identity_analysis.ipynb", notebook_env, monkeypatch)
    assert "embedder: dlib-resnet128-hog5" in output
    for text in ("Synthetic vs real", "Real vs real", "EER", "decidability", "mean cosine"):
        assert text in output
    assert output.count("data:image/png;base64,") == 9  # hist / ROC / DET x 3 comparisons


@pytest.mark.slow
def test_diversity_fidelity_notebook_runs(notebook_env, monkeypatch):
    output = run_notebook("diversity_fidelity.ipynb", notebook_env, monkeypatch)
    assert "feature model: dino-" in output
    for text in ("Vendi ↑ mean", "person_0", "precision", "coverage", "KD subsets"):
        assert text in output


@pytest.fixture(scope="module")
def model_weights(tmp_path_factory) -> dict[str, str]:
    """A random CR-FIQA(S) (iresnet50, so the paper's setting runs) and a random 6DRepNet,
    each saved in its official key layout."""
    import torch
    from test_pose_6drepnet import random_state

    import quality
    from random_models import calibrate_batchnorm

    root = tmp_path_factory.mktemp("notebook_models")
    torch.manual_seed(0)
    faces = torch.rand((8, 3, 112, 112), generator=torch.Generator().manual_seed(1)) * 2 - 1
    crfiqa = calibrate_batchnorm(quality.build_crfiqa("r50"), [faces])
    torch.save(crfiqa.state_dict(), root / "32572backbone.pth")
    torch.save(random_state(), root / "6DRepNet_300W_LP_AFLW2000.pth")
    return {
        "IDB_QUALITY_WEIGHTS": str(root / "32572backbone.pth"),
        "IDB_POSE_WEIGHTS": str(root / "6DRepNet_300W_LP_AFLW2000.pth"),
        "IDB_FACE_DETECTOR": "dlib",
    }


@pytest.mark.slow
def test_quality_notebook_runs_the_papers_setting(notebook_env, model_weights, monkeypatch):
    output = run_notebook("quality_analysis.ipynb", notebook_env | model_weights, monkeypatch)
    assert "setting: paper - the paper's: CR-FIQA(S)" in output
    assert "model: crfiqa-32572backbone-" in output and "-dlib-hog68-bgr" in output
    for text in ("Face image quality (CR-FIQA)", "CR-FIQA ↑ mean ± std", "ID-Booth", "real"):
        assert text in output
    assert output.count("data:image/png;base64,") == 1  # the score histogram


@pytest.mark.slow
def test_pose_notebook_runs_6drepnet_and_the_fallback(notebook_env, model_weights, monkeypatch):
    output = run_notebook("pose_analysis.ipynb", notebook_env | model_weights, monkeypatch)
    assert "estimator: 6drepnet-300W_LP_AFLW2000-" in output
    assert "comparable with the paper: True" in output
    table_texts = ("yaw mean ± std, all faces", "pitch std per identity ↑", "ID-Booth: yaw std")
    for text in (*table_texts, "person_0"):
        assert text in output
    assert output.count("data:image/png;base64,") == 2  # a scatter per set (generated, real)
    fallback = notebook_env | model_weights | {"IDB_POSE_WEIGHTS": ""}
    output = run_notebook("pose_analysis.ipynb", fallback, monkeypatch)
    assert "estimator: dlib-hog68-pnp14 - comparable with the paper: False" in output
    assert "not comparable with the paper" in output


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_stored_stripped_and_reuse_the_shared_code(name):
    notebook = nbformat.read(EVALUATION_DIR / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    source = "\n".join(cell.source for cell in code)
    assert "import evaluate" in source and "import report" in source
    assert "def " not in source and "lambda" not in source  # no metric logic copied in


@pytest.mark.slow
def test_fr_utility_notebook_trains_verifies_and_tables(notebook_env, monkeypatch, tmp_path):
    """Tiny FR models on the real-face folders, verified on a .bin cut from the same faces."""
    import io

    from evaluation_data import variants

    from verify import write_bin

    crops = real_face_crops()
    encoded, issame = [], []
    names = sorted(crops)
    for index, name in enumerate(names):
        same = [variants(crops[name], 2), [crops[name], crops[names[index - 1]]]]
        for pair, is_same in zip(same, (True, False), strict=True):
            for image in pair:
                buffer = io.BytesIO()
                image.resize((112, 112)).save(buffer, format="PNG")
                encoded.append(buffer.getvalue())
            issame.append(is_same)
    write_bin(tmp_path / "bins" / "pairs.bin", encoded, issame)
    env = {
        **notebook_env,
        "IDB_FR_BENCHMARKS": str(tmp_path / "bins"),
        "IDB_FR_SETTINGS": "real synthetic",
        "IDB_FACE_DETECTOR": "dlib",
        "IDB_FR_FLAGS": "--backbone=r18 --embedding_size=32 --batch_size=2 --num_epochs=1 "
        "--learning_rate=0.01 --mixed_precision=no --dataloader_num_workers=0",
    }
    output = run_notebook("fr_utility.ipynb", env, monkeypatch)
    for text in ("training data | faces (skipped)", "real | 6 (0) | 3", "synthetic (ID-Booth)"):
        assert text in output
    assert "Face-recognition utility" in output and "model of epoch 1 of 1" in output
    assert output.count("<Figure size") == 1  # the selection curves


def test_fr_utility_notebook_is_stored_stripped_and_reuses_the_shared_code():
    notebook = nbformat.read(EVALUATION_DIR / "fr_utility.ipynb", as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    source = "\n".join(cell.source for cell in code)
    assert "import fr_utility" in source and "import report" in source
    assert "def " not in source and "lambda" not in source
