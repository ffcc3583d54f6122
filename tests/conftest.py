"""Shared test setup: everything offline, repo root importable, small thread pools."""

import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# File hashes (runs.cached_sha256) go to a cache of the test session, not the user's.
os.environ.setdefault("ID_BOOTH_CACHE", tempfile.mkdtemp(prefix="id_booth_cache-"))

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, REPO_ROOT / "tests", REPO_ROOT / "Evaluation"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module: tiny models on a shared 2-core machine run several
    times faster (no OpenMP spinning), and subprocesses and torchrun workers started with
    OMP_NUM_THREADS=1 then share the tests' CPU summation order. Use with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fake_base_model(folder: Path) -> Path:
    """A folder laid out as a saved SD pipeline (what runs.check_base_model looks at); calling
    it again on the same folder rewrites the same files."""
    for name in ("unet", "vae", "text_encoder"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text("{}")
        (folder / name / "model.safetensors").write_bytes(b"")
    (folder / "tokenizer").mkdir(exist_ok=True)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    (folder / "model_index.json").write_text("{}")
    return folder
