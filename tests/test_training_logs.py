"""Evaluation/training_logs.py: each identity's curves are read from inside its own folder."""

from __future__ import annotations

import json
import logging

import training_logs


def test_a_logging_dir_outside_the_identity_folder_is_not_followed(tmp_path, caplog):
    """An absolute or '..' logging_dir (one folder shared by every identity) would show one
    identity's curves for all: it is not read, with a warning naming the identity."""
    shared = tmp_path / "shared_logs"
    shared.mkdir()
    for name, logging_dir in (("ID_a", "logs"), ("ID_b", str(shared)), ("ID_c", "../../x")):
        folder = tmp_path / "loras" / name
        folder.mkdir(parents=True)
        config = {"args": {"logging_dir": logging_dir}}
        (folder / training_logs.CONFIG_NAME).write_text(json.dumps(config))
    root = tmp_path / "loras"
    assert training_logs.logging_dir_of(root / "ID_a") == root / "ID_a" / "logs"
    with caplog.at_level(logging.WARNING):
        for name in ("ID_b", "ID_c"):
            folder = training_logs.logging_dir_of(root / name)
            assert folder.resolve().is_relative_to((root / name).resolve())
    assert "ID_b" in caplog.text and "outside the identity's folder" in caplog.text
