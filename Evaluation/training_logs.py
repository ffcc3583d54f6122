"""Training curves of train_ID-Booth.py runs, read back from their TensorBoard event files.

The trainer writes, per identity, `LORA_ROOT/<identity>/<logging_dir>/events.out.tfevents.*`
(`logging_dir` is "logs" unless the identity's training_config.json says otherwise under
["args"]["logging_dir"]). Scalars: `train/<term>` every --logging_steps steps (interval means
of loss, diffusion_loss, prior_loss and, for identity losses, triplet_loss or identity_loss,
identity_term, identity_weight, identity_samples_per_batch; plus train/lr and the running count
train/identity_samples) and `epoch/<term>` once per epoch (epoch means). A resumed run adds an
event file that repeats the steps after its checkpoint: the value written last wins.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

CONFIG_NAME = "training_config.json"  # train_ID-Booth.py's CONFIG_NAME
logger = logging.getLogger("training_logs")
DEFAULT_LOGGING_DIR = "logs"  # train_ID-Booth.py's --logging_dir default
# Loss terms drawn as panels, first in this order, then any other train/ tag by name.
CURVE_TERMS = (
    "loss",
    "diffusion_loss",
    "prior_loss",
    "triplet_loss",
    "identity_loss",
    "identity_term",
    "identity_weight",
    "identity_samples_per_batch",
)
NOT_CURVES = ("lr", "identity_samples")  # the schedule and a running count, not loss terms
CURVE_PREFIX = "train/"

Curve = tuple[list[int], list[float]]  # (steps, values), steps increasing


def logging_dir_of(identity_dir: Path) -> Path:
    """The identity's TensorBoard folder: its config's args.logging_dir, else "logs"; always
    inside the identity's folder (an absolute or '..' logging_dir, which older runs allowed,
    is shared by every identity: its curves are nobody's own, so they are not read)."""
    name = DEFAULT_LOGGING_DIR
    # No or unreadable config: the trainer's default is the best guess.
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        name = json.loads((identity_dir / CONFIG_NAME).read_text())["args"]["logging_dir"] or name
    folder = identity_dir / str(name)
    if not folder.resolve().is_relative_to(identity_dir.resolve()):
        logger.warning(
            "%s: its logging_dir %s lies outside the identity's folder (shared by every "
            "identity); its training curves are not read",
            identity_dir,
            name,
        )
        return identity_dir / DEFAULT_LOGGING_DIR
    return folder


def identity_folders(lora_root: Path) -> list[Path]:
    """The root itself when it is one identity's run, else its sub-folders that hold a run."""
    if (lora_root / CONFIG_NAME).is_file():
        return [lora_root]
    if not lora_root.is_dir():
        return []
    return sorted(
        folder
        for folder in lora_root.iterdir()
        if folder.is_dir() and ((folder / CONFIG_NAME).is_file() or logging_dir_of(folder).is_dir())
    )


def last_value_per_step(events) -> Curve:
    """(steps, values) of TensorBoard ScalarEvents, the latest-written value of each step."""
    latest: dict[int, tuple[float, float]] = {}  # step -> (wall_time, value)
    for event in events:
        if event.step not in latest or event.wall_time >= latest[event.step][0]:
            latest[event.step] = (event.wall_time, float(event.value))
    steps = sorted(latest)
    return steps, [latest[step][1] for step in steps]


def read_scalars(log_dir: Path) -> dict[str, Curve]:
    """{tag: (steps, values)} of every event file in `log_dir` (all points kept, no sampling)."""
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(
        str(log_dir),
        size_guidance={event_accumulator.SCALARS: 0},  # 0 = keep every point
        purge_orphaned_data=False,  # duplicates are resolved by last_value_per_step
    )
    accumulator.Reload()
    return {
        tag: last_value_per_step(accumulator.Scalars(tag)) for tag in accumulator.Tags()["scalars"]
    }


def curve_summary(curve: Curve) -> dict[str, float | int]:
    """Points, first / last step and value, min and max of one curve."""
    steps, values = curve
    return {
        "n_points": len(steps),
        "first_step": steps[0],
        "last_step": steps[-1],
        "first": values[0],
        "last": values[-1],
        "min": min(values),
        "max": max(values),
    }


def _identity_scalars(folder: Path) -> tuple[dict[str, Curve] | None, str]:
    """(scalars, log folder) of one identity; None when the folder has no usable scalars."""
    log_dir = logging_dir_of(folder)
    if not log_dir.is_dir():
        return None, str(log_dir)
    try:
        scalars = read_scalars(log_dir)
    except Exception:  # a damaged log (any reader error) must cost its curve, not the report
        return None, str(log_dir)
    return (scalars or None), str(log_dir)


def read_training_logs(lora_root: Path) -> tuple[dict, dict[str, dict[str, Curve]]]:
    """({identity: {log_dir, tags: {tag: curve_summary}}, missing: [...]} or {'skipped': why},
    {identity: {tag: curve}}) for one method's LoRA folder."""
    lora_root = Path(lora_root).expanduser()
    folders = identity_folders(lora_root)
    if not folders:
        why = f"no identity run (a folder with {CONFIG_NAME} or {DEFAULT_LOGGING_DIR}/) in"
        return {"skipped": f"{why} {lora_root}", "looked_at": str(lora_root)}, {}
    summary: dict = {"root": str(lora_root), "identities": {}, "missing": []}
    curves: dict[str, dict[str, Curve]] = {}
    for folder in folders:
        scalars, log_dir = _identity_scalars(folder)
        if scalars is None:
            summary["missing"].append({"identity": folder.name, "looked_at": log_dir})
            continue
        curves[folder.name] = scalars
        summary["identities"][folder.name] = {
            "log_dir": log_dir,
            "tags": {tag: curve_summary(curve) for tag, curve in scalars.items()},
        }
    if not curves:
        looked = ", ".join(entry["looked_at"] for entry in summary["missing"])
        summary["skipped"] = f"no TensorBoard scalars in {looked}"
    return summary, curves


def curve_panels(curves: dict[str, dict[str, Curve]]) -> list[str]:
    """Terms any identity logged as train/<term>: CURVE_TERMS first, then the rest by name."""
    logged = {
        tag[len(CURVE_PREFIX) :]
        for scalars in curves.values()
        for tag in scalars
        if tag.startswith(CURVE_PREFIX)
    }
    logged -= set(NOT_CURVES)
    return [term for term in CURVE_TERMS if term in logged] + sorted(logged - set(CURVE_TERMS))
