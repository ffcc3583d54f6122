"""Test-side name for the tiny random SD pipeline builder (lives in random_models.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from random_models import build_tiny_sd, write_byte_level_clip_tokenizer  # noqa: E402, F401
