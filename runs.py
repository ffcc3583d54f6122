"""Run plumbing shared by every script: command-line entry, logging, processes, precision,
identity folders, checkpoints, run configs and resume checks.

Each script reads top to bottom as parse -> validate -> build -> loop -> save; what they all
need around that (one error line instead of a traceback, one logging format, one way to find
`ROOT/<identity>/` folders, one checkpoint layout, one precision rule, the library versions in
every config) lives here, so the scripts cannot drift apart.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fileio import atomic_folder, remove_stale_temps

logger = logging.getLogger("runs")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
# Long enough for the last barrier of a resumed multi-process run, where one process may have
# hours more work than another (torch's default of 10-30 min would kill the finished one).
BARRIER_TIMEOUT = datetime.timedelta(hours=72)
MODEL_COMPONENTS = {  # subfolder of a diffusers SD pipeline folder -> a file it must hold
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": None,
    "scheduler": "scheduler_config.json",
}
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "org/name"
INTERRUPTED_EXIT_CODE = 130  # what a shell reports for a process ended by Ctrl-C (SIGINT)


class _TorchvisionFallbackNotice(logging.Filter):
    """Drops transformers' notice that an image processor falls back to its PIL version
    without torchvision: this project never installs torchvision (README), so the notice
    would open every run of every script."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackNotice())


# The paper's negative prompt for generation (and training's validation images).
PAPER_NEGATIVE_PROMPT = (
    "cartoon, cgi, render, illustration, painting, drawing, black and white, "
    "bad body proportions, landscape"
)


# ============================================================================ entry and logging


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with '(required)' on required flags and '(default: X)' only where X says
    something: not for None or off switches, nor where the help text already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required:
            return f"{text} (required)"
        quiet = action.default is None or action.default is False or action.default == ""
        if quiet or "default" in text.lower() or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser: its docstring's first paragraph on top of --help, the rest (examples
    and details, as written) at the end; defaults and required flags marked. Abbreviations
    are refused (allow_abbrev=False): argparse would read '--learn 1e-4' as --learning_rate,
    and a flag added later could silently change what an old abbreviation means."""
    description, _, details = doc.partition("\n\n")
    return argparse.ArgumentParser(
        description=description,
        epilog=details.strip() or None,
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )


def group_flags(parser: argparse.ArgumentParser, groups: dict[str, list[str]]) -> None:
    """Show the flags under titled sections of --help (title -> flag dests, in order); only
    the display changes: flags not listed stay under 'options'. ValueError for an unknown dest."""
    actions = {action.dest: action for action in parser._actions}
    unknown = [dest for dests in groups.values() for dest in dests if dest not in actions]
    if unknown:
        raise ValueError(f"group_flags: no such flags {unknown}")
    for title, dests in groups.items():
        group = parser.add_argument_group(title)
        for dest in dests:
            group._group_actions.append(actions[dest])
            parser._optionals._group_actions.remove(actions[dest])


def run_cli(
    program: str,
    parse_args: Callable[[], argparse.Namespace],
    main: Callable[[argparse.Namespace], Any],
    exit_code: Callable[[Any], int] | None = None,
    errors: tuple[type[BaseException], ...] = (),
) -> None:
    """Run a script's main; bad input (ValueError, OSError, `errors`) ends in one
    `program: error: message` line, Ctrl-C in one line and exit code 130, never a traceback."""
    try:
        result = main(parse_args())
        end_process_group()
    except KeyboardInterrupt:
        print(
            f"{program}: interrupted; finished outputs are kept, re-run to resume", file=sys.stderr
        )
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
    except (ValueError, OSError, *errors) as error:
        raise SystemExit(f"{program}: error: {error}") from None
    raise SystemExit(exit_code(result) if exit_code is not None else 0)


def load_script(path: Path) -> Any:
    """A script of this repo imported as a module, once per process (file names such as
    train_ID-Booth.py hold a hyphen, so `import` cannot name them). Its folder joins the end of
    sys.path, so the script's sibling modules import as when it runs as a program."""
    import importlib.util

    path = Path(path).resolve()
    name = path.stem.replace("-", "_")
    if name in sys.modules:
        return sys.modules[name]
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here while it executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def end_process_group() -> None:
    """Destroy torch.distributed's default group if a launcher started one (at a script's end,
    not inside main: a caller may run several scripts' mains in one process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def setup_logging(state: Any = None) -> None:
    """INFO logs `time [rank i/n] LEVEL message` (no rank without a process state), unless the
    host program (e.g. pytest) already configured logging."""
    if logging.getLogger().handlers:
        return
    rank = "" if state is None else f"[rank {state.process_index}/{state.num_processes}] "
    logging.basicConfig(format=f"%(asctime)s {rank}%(levelname)s %(message)s", level=logging.INFO)


def process_state() -> Any:
    """accelerate's PartialState; cpu=True without CUDA so torchrun on CPU uses gloo."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)


def resolve_mixed_precision(requested: str, device_type: str) -> str:
    """The precision a run uses: the one asked for, on any device (torch runs fp16 and bf16 on
    the CPU too, slowly, so the mixed-precision code paths are the same everywhere)."""
    if requested not in MIXED_PRECISIONS:
        raise ValueError(f"unknown mixed precision {requested!r}; options: {MIXED_PRECISIONS}")
    return requested


# ============================================================================ configs


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a run depends on (and the GPU, if any)."""
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "peft": peft.__version__,
        "numpy": np.__version__,
    }
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
        versions["gpu"] = torch.cuda.get_device_name()
    return versions


def json_safe(value: Any) -> Any:
    """A JSON-serialisable copy: Namespaces and mappings to dicts, tuples/arrays to lists, numpy
    scalars to Python, paths to strings, non-finite floats to 'nan' / 'inf' / '-inf'."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Path):
        return str(value)
    return value


MISSING = "<not set>"  # how a setting absent from one of two configs is shown


def config_mismatches(
    saved: Mapping[str, Any], current: Mapping[str, Any], may_change: Collection[str], label=""
) -> list[str]:
    """'label key: saved -> current' for every key of either config that is not in may_change
    and differs, a key missing on one side included: settings nobody listed must match."""
    keys = sorted((set(saved) | set(current)) - set(may_change))
    return [
        f"{label}{key}: {saved.get(key, MISSING)!r} -> {current.get(key, MISSING)!r}"
        for key in keys
        if saved.get(key, MISSING) != current.get(key, MISSING)
    ]


# ============================================================================ identity folders


def is_inside(path: Path, folder: Path) -> bool:
    """True when `path` is `folder` or lies below it (both resolved)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def check_identity_name(name: str, flag: str) -> str:
    """An identity name is one path component: ValueError for '', '.', '..', separators or an
    absolute path, so a path built from it stays inside the folder it belongs to."""
    bad = name in ("", ".", "..") or "/" in name or "\\" in name or Path(name).is_absolute()
    if bad or Path(name).name != name:
        raise ValueError(
            f"{flag}: {name!r} is not an identity name (one folder name, without '/' or '..')"
        )
    return name


def identity_folders(root: Path) -> list[Path]:
    """Sorted identity folders `ROOT/<identity>/`: every subfolder not hidden (caches, temps)."""
    return sorted(
        path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")
    )


@dataclass(frozen=True)
class Identity:
    """One identity of a run: its name, the folder it is made from, the folder it writes."""

    name: str
    instance_dir: Path
    output_dir: Path


def identity_runs(single: Path | None, root: Path | None, output_dir: Path) -> list[Identity]:
    """One identity (`single` -> output_dir) or every identity folder of `root`
    (ROOT/<identity> -> output_dir/<identity>); ValueError when root holds none."""
    if single is not None:
        return [Identity(single.resolve().name, single, output_dir)]
    folders = identity_folders(root)
    if not folders:
        raise ValueError(f"{root} holds no identity folders; put one folder per identity there")
    return [Identity(path.name, path, output_dir / path.name) for path in folders]


def remove_stale_temporaries(folder: Path, prefixes: tuple[str, ...] = ()) -> None:
    """Delete what killed writers left in `folder`: fileio temps and folders named prefix*."""
    remove_stale_temps(folder)
    for path in folder.glob(".*"):
        if path.is_dir() and path.name.startswith(prefixes):
            shutil.rmtree(path)


def delete_outputs(folder: Path, files: Iterable[str], folders: Iterable[str | Path]) -> None:
    """Delete the named files and folders of an earlier run in `folder` (e.g. --overwrite)."""
    for name in files:
        (folder / name).unlink(missing_ok=True)
    for name in folders:
        if (folder / name).is_dir():
            shutil.rmtree(folder / name)


def check_writable_folder(folder: Path, flag: str) -> None:
    """Create the folder and prove it is writable (ValueError with the fix if not)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(
            f"{flag} {folder} is not a writable folder ({error}); choose another path"
        ) from error


# ============================================================================ checkpoints


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def list_checkpoints(folder: Path, required_file: str | None) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoint-N folders (those holding required_file, if given), oldest
    first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        complete = path.is_dir() if required_file is None else (path / required_file).is_file()
        if match and complete:
            found.append((int(match.group(1)), path))
    return sorted(found)


def write_checkpoint(
    output_dir: Path,
    step: int,
    fill: Callable[[Path], None],
    required_file: str,
    keep: int | None = None,
) -> Path:
    """Write output_dir/checkpoint-<step>/ atomically (`fill` writes into a temp folder that
    replaces it when complete), then keep only the newest `keep` checkpoints (None / 0: all)."""
    folder = output_dir / checkpoint_name(step)
    with atomic_folder(folder) as temp:
        fill(temp)
    if keep:
        for _, old in list_checkpoints(output_dir, required_file)[:-keep]:
            shutil.rmtree(old)
    return folder


def find_checkpoint(value: str | None, output_dir: Path, required_file: str) -> Path | None:
    """The checkpoint a run resumes from: None for a fresh run; 'latest' is the newest complete
    one in output_dir (None when there is none yet); any other value is that folder itself or
    output_dir/<value>, FileNotFoundError when neither holds required_file."""
    if value is None:
        return None
    if value == "latest":
        checkpoints = list_checkpoints(output_dir, required_file)
        if not checkpoints:
            logger.info("no checkpoint in %s yet; starting a new run", output_dir)
        return checkpoints[-1][1] if checkpoints else None
    for candidate in (Path(value).expanduser(), output_dir / value):
        if (candidate / required_file).is_file():
            return candidate
    raise FileNotFoundError(
        f"checkpoint {value} not found (looked for {Path(value) / required_file} and "
        f"{output_dir / value / required_file}); pass an existing checkpoint-N folder or 'latest'"
    )


# ============================================================================ base model


def looks_like_path(name: str) -> bool:
    """True for strings that cannot be a hub id: absolute, ./, ~, or more than one '/'."""
    return HUB_ID.match(name) is None


def _has_weights(folder: Path) -> bool:
    """Whether a component folder holds weights (single file, variant or sharded)."""
    return any(
        path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json")
        for path in folder.iterdir()
    )


def check_base_model(name: str, variant: str | None = None) -> None:
    """FileNotFoundError naming what is wrong with the base model before anything loads it: a
    path that does not exist, a file (a single-file checkpoint) where a folder is needed, a
    component folder (BASE/unet) where its pipeline folder is needed, a folder that lacks a
    component or the asked `variant`'s weights, or a hub id that is not cached while the hub
    is offline."""
    path = Path(name).expanduser()
    if path.is_file():
        raise FileNotFoundError(
            f"base model {path} is a file, not a folder; {single_file_hint(path)}"
        )
    if path.is_dir() and _is_component_folder(path):
        raise FileNotFoundError(
            f"base model folder {path} is the {path.name}/ component of a pipeline; pass the "
            f"pipeline folder that holds model_index.json: {path.parent}"
        )
    if not path.exists():
        if looks_like_path(name):
            raise FileNotFoundError(
                f"base model folder {path} does not exist; pass a hub id "
                "(stabilityai/stable-diffusion-2-1-base) or a folder saved with save_pretrained"
            )
        check_hub_cache(name)
        return
    missing = [
        f"{folder}/{required or ''}"
        for folder, required in MODEL_COMPONENTS.items()
        if not (path / folder / (required or "")).exists()
    ]
    missing += [
        f"{folder}/ weights (*.safetensors or *.bin)"
        for folder in WEIGHTED_COMPONENTS
        if (path / folder).is_dir() and not _has_weights(path / folder)
    ]
    if not (path / "model_index.json").is_file():
        missing.insert(0, "model_index.json")
    if missing:
        raise FileNotFoundError(
            f"base model folder {path} is incomplete: missing {', '.join(missing)}; save the "
            "whole pipeline with StableDiffusionPipeline.save_pretrained (or download all of it)"
        )
    if variant is not None:
        check_variant(path, variant)


def _is_component_folder(path: Path) -> bool:
    """A pipeline's component folder (unet/, vae/, ...): named like one, no model_index.json
    of its own, and its parent holds one."""
    return (
        path.name in MODEL_COMPONENTS
        and not (path / "model_index.json").exists()
        and (path.parent / "model_index.json").is_file()
    )


def check_variant(folder: Path, variant: str) -> None:
    """The asked weights variant must exist in the pipeline folder: diffusers' loader then
    fails in a way `loading` can only blame on corrupt weights."""
    components = [path for path in (folder / name for name in WEIGHTED_COMPONENTS) if path.is_dir()]
    has_variant = any(
        _variant(file) == variant
        for component in components
        for file in component.iterdir()
        if file.name.endswith(WEIGHT_SUFFIXES)
    )
    if components and not has_variant:
        raise FileNotFoundError(
            f"no {variant} variant files in {folder} (e.g. unet/diffusion_pytorch_model."
            f"{variant}.safetensors); drop --variant"
        )


# Weight files of a pipeline folder; a component folder may hold several variants of them
# (model.safetensors, model.fp16.safetensors, ...), and a hub repo's top level single-file
# checkpoints that diffusers' folder loader never reads.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx")
SHA256_CACHE_NAME = "file_sha256.json"


def cache_folder() -> Path:
    """This project's per-user cache: $ID_BOOTH_CACHE, else $XDG_CACHE_HOME/id_booth, else
    ~/.cache/id_booth."""
    if os.environ.get("ID_BOOTH_CACHE"):
        return Path(os.environ["ID_BOOTH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "id_booth"


def cached_sha256(paths: Iterable[Path]) -> dict[Path, str]:
    """sha256 of each file's bytes, hashed once and remembered in cache_folder() under the
    file's (resolved path, size, mtime_ns, inode): any rewrite or replacement of the file
    changes one of them, so a cached hash is never served for other bytes, and a multi-GB base
    model is read once, not at every run. A cache that cannot be read or written only costs the
    hashing time."""
    import json

    from fileio import atomic_write_json, file_sha256

    cache_path = cache_folder() / SHA256_CACHE_NAME
    try:
        cache = json.loads(cache_path.read_text())
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    hashes, added = {}, False
    for path in paths:
        real = Path(path).resolve()
        info = real.stat()
        key = f"{real}|{info.st_size}|{info.st_mtime_ns}|{info.st_ino}"
        if not isinstance(cache.get(key), str):
            cache[key], added = file_sha256(real), True
        hashes[path] = cache[key]
    if added:
        with contextlib.suppress(OSError):
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cache_path, cache, fsync=False)
    return hashes


def base_model_folder(name: str, revision: str | None = None, variant: str | None = None) -> Path:
    """The folder from_pretrained reads: a local folder as given, a hub id's cached snapshot
    (downloaded as from_pretrained would when it is not cached yet)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, local_files_only=True))
    except Exception:  # not cached: fetch what the pipeline loader fetches (offline: raises)
        from diffusers import DiffusionPipeline

        with loading("the Stable Diffusion pipeline", name):
            return Path(DiffusionPipeline.download(name, revision=revision, variant=variant))


def _variant(path: Path) -> str | None:
    """The variant infix of a weights file name: 'fp16' for model.fp16.safetensors, else None."""
    parts = path.name.split(".")
    return parts[-2] if len(parts) > 2 else None


def loaded_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The files of a pipeline folder that from_pretrained(variant=...) may read: every
    non-weight file (configs, tokenizer; nothing hidden) and, inside each component folder,
    the weights of that variant (all its weights where it has none of the variant, as the
    loader then falls back). Top-level single-file checkpoints are never read."""
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    weights: dict[Path, list[Path]] = {}
    for path in files:
        if path.name.endswith(WEIGHT_SUFFIXES) and path.parent != folder:
            weights.setdefault(path.parent, []).append(path)
    chosen = set()
    for component_files in weights.values():
        of_variant = [path for path in component_files if _variant(path) == variant]
        chosen.update(of_variant or component_files)
    return [path for path in files if not path.name.endswith(WEIGHT_SUFFIXES) or path in chosen]


def base_model_fingerprint(
    name: str, revision: str | None = None, variant: str | None = None
) -> str:
    """The base model by content: sha256 over 'relative path:sha256' of every file its
    pipeline folder loads (loaded_files), so a replaced folder or a moved hub revision
    under the same name is another model (file hashes cached: cached_sha256)."""
    import hashlib

    folder = base_model_folder(name, revision, variant)
    files = loaded_files(folder, variant)
    hashes = cached_sha256(files)
    lines = "".join(f"{path.relative_to(folder).as_posix()}:{hashes[path]}\n" for path in files)
    return hashlib.sha256(lines.encode()).hexdigest()


# A single-file SDXL checkpoint holds its second text encoder under this key prefix.
SDXL_SINGLE_FILE_PREFIX = "conditioner.embedders.1"


def single_file_pipeline_classes(path: Path) -> list[str]:
    """The diffusers pipeline class(es) a single-file checkpoint may be: read from a
    .safetensors header's key names (cheap: no tensor is loaded); both SD classes when the
    keys cannot be read (a .ckpt pickle, a damaged file)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as checkpoint:
            keys = list(checkpoint.keys())
    except Exception:  # not a safetensors file, or unreadable: no guess
        return ["StableDiffusionPipeline", "StableDiffusionXLPipeline"]
    if any(key.startswith(SDXL_SINGLE_FILE_PREFIX) for key in keys):
        return ["StableDiffusionXLPipeline"]
    return ["StableDiffusionPipeline"]


def single_file_hint(path: Path) -> str:
    """How to turn the single-file checkpoint `path` into a pipeline folder."""
    commands = [
        f'python -c "from diffusers import {name}; '
        f"{name}.from_single_file('{path}').save_pretrained('FOLDER')\""
        for name in single_file_pipeline_classes(path)
    ]
    if len(commands) == 1:
        return f"a single-file checkpoint becomes a folder with {commands[0]}"
    return (
        "a single-file checkpoint becomes a folder with (SD 1.x / 2.x) "
        f"{commands[0]} or (SDXL) {commands[1]}"
    )


def check_hub_cache(
    repo_id: str,
    what: str = "base model",
    filename: str = "model_index.json",
    alternative: str = "pass a folder saved with save_pretrained",
) -> None:
    """With the hub offline (HF_HUB_OFFLINE=1), a hub id must be in the local cache (its
    `filename` there): say so at once instead of after the loader's retries and a 'could not
    load' error, and after hours of work that did not need it."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return  # the loader downloads it (or reads the cache)
    if isinstance(try_to_load_from_cache(repo_id, filename), str):
        return
    raise FileNotFoundError(
        f"{what} {repo_id!r} is not a local folder (none at {Path(repo_id).resolve()}) "
        f"and not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE=1 "
        f"forbids downloading it: run `huggingface-cli download {repo_id}` where the hub is "
        f"reachable, or {alternative}"
    )


@contextlib.contextmanager
def loading(what: str, source: object) -> Iterator[None]:
    """Turn any failure while loading user-given weights into one ValueError naming them (a
    truncated or garbage file raises SafetensorError, UnpicklingError, RuntimeError, ...)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        if isinstance(error, OSError) and _is_hub_error(error, source):
            raise ValueError(
                f"could not get {what} from the Hugging Face hub ({first_line}); check the hub "
                "id and your connection, or pass a local folder saved with save_pretrained"
            ) from error
        raise ValueError(
            f"could not load {what} from {source} ({type(error).__name__}: {first_line}); "
            "a weights file is truncated, corrupt or of another model: download or save it again"
        ) from error


def _is_hub_error(error: OSError, source: object) -> bool:
    """Whether loading a hub id failed on the hub (no connection, unknown repo, not cached)
    rather than on the files' contents."""
    from huggingface_hub.errors import HfHubHTTPError

    if not isinstance(source, str) or Path(source).expanduser().exists():
        return False
    hub_errors = (HfHubHTTPError, ConnectionError)
    return isinstance(error, hub_errors) or "huggingface.co" in str(error)


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """'1 identity', '2 identities', '0 photos': a count with its noun in the right number
    (`plural_form` for irregular nouns; by default -y after a consonant becomes -ies, else -s)."""
    if count == 1:
        return f"{count} {noun}"
    if plural_form is None:
        consonant_y = noun.endswith("y") and noun[-2:-1] not in tuple("aeiou")
        plural_form = noun[:-1] + "ies" if consonant_y else noun + "s"
    return f"{count} {plural_form}"


def format_list(items: Iterable[str], limit: int = 8) -> str:
    """The first `limit` items joined by ', ', plus how many more there are."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" ... (+{len(items) - limit} more)" if len(items) > limit else "")


# ============================================================================ progress


# Seconds between redraws of a progress bar whose stream is not a terminal (a cluster job's
# log file): tqdm's 0.1 s there appends a ~290-byte line per training step (600 MB for the
# paper's 107 x 3 x 6,400 steps); once a minute is about 10 KB per identity.
LOG_FILE_REDRAW_SECONDS = 60.0


def progress_bar(**options: Any) -> Any:
    """tqdm(**options) that redraws as usual on a terminal and at most once a minute when its
    stream (`file`, default stderr) is a file or a pipe."""
    from tqdm.auto import tqdm

    stream = options.get("file") or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        options.setdefault("mininterval", LOG_FILE_REDRAW_SECONDS)
        options["maxinterval"] = max(options.get("maxinterval", 10.0), options["mininterval"])
        options["dynamic_ncols"] = False
    return tqdm(**options)


_progress_context = ""


def set_progress_context(text: str) -> None:
    """Text that every RunProgress line starts with (reproduce_ID-Booth.py: 'variant 2 of 3')."""
    global _progress_context
    _progress_context = text


class RunProgress:
    """Counts a run's units (identities, images) and logs 'identity 37 of 107' lines with
    the counts so far and an ETA from the throughput since the run started."""

    def __init__(self, unit: str, total: int, clock: Callable[[], float] = time.monotonic):
        self.unit, self.total, self.clock = unit, total, clock
        self.started_at = clock()
        self.started = self.finished = self.failed = 0

    def start(self, name: str) -> None:
        self.started += 1
        logger.info("%s%s %d of %d: %s", self._context(), self.unit, self.started, self.total, name)

    def done(self, name: str, failed: bool = False) -> None:
        self.finished += 1
        self.failed += failed
        logger.info(
            "%s%s %d of %d done (%s%s): %d finished, %d failed, %s",
            self._context(),
            self.unit,
            self.finished,
            self.total,
            name,
            ", failed" if failed else "",
            self.finished - self.failed,
            self.failed,
            self.eta(),
        )

    def eta(self) -> str:
        """'ETA 1 h 05 min' from the mean time per finished unit, 'done' when all are."""
        remaining = self.total - self.finished
        if remaining <= 0:
            return "done"
        seconds = (self.clock() - self.started_at) / max(self.finished, 1) * remaining
        return f"ETA {format_duration(seconds)}"

    @staticmethod
    def _context() -> str:
        return f"{_progress_context}, " if _progress_context else ""


def format_duration(seconds: float) -> str:
    """'42 s', '7 min 05 s', '3 h 12 min'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


# ============================================================================ device-side watches


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; training stopped before saving anything from that state."""


class NonFiniteWatch:
    """Remembers, on the device, the first step whose named values held NaN/inf, for each of
    `rows` independent runs (the identities of a packed trainer; 1 for a plain run).

    Updating costs a few tiny device ops and no sync; check() reads it (one sync) and is called
    at log intervals, before every checkpoint and before the final save, so a bad state is never
    saved and the step number reported is exact.
    """

    def __init__(self, names: tuple[str, ...], device: Any, rows: int = 1) -> None:
        import torch

        self.names = names
        self.first_step = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.bad = torch.zeros(rows, len(names), dtype=torch.bool, device=device)

    def update(self, values: Any, step: Any, index: Any = None) -> None:
        """values: (S, len(names)) of rows `index` (S,) at their steps `step` (S,) (device
        tensors), or (len(names),) of row 0 at int step."""
        import torch

        if index is None:
            values, index = values[None], torch.zeros(1, dtype=torch.long, device=values.device)
            step = torch.full((1,), step, dtype=torch.long, device=values.device)
        bad = ~torch.isfinite(values)  # (S, T)
        first = bad.any(1) & (self.first_step[index] < 0)  # (S,)
        self.first_step[index] = torch.where(first, step, self.first_step[index])
        self.bad[index] = torch.where(first[:, None], bad, self.bad[index])

    def reset(self, row: int = 0) -> None:
        self.first_step[row] = -1
        self.bad[row] = False

    def state(self, rows: Any) -> Any:
        """(S, 1 + len(names)) float64 on the device for rows (an index or slice of S rows): each
        row's first bad step (-1: none) and
        which values were bad then (0/1), for `raise_if_bad` after one host read of many."""
        import torch

        return torch.cat([self.first_step[rows, None].double(), self.bad[rows].double()], 1)

    def raise_if_bad(self, where: str, state: list[float]) -> None:
        """check() on a row of `state` already read on the host (no device access)."""
        step = int(state[0])
        if step >= 0:
            self._raise(where, step, [bool(value) for value in state[1:]])

    def check(self, where: str, row: int = 0) -> None:
        """Raise NonFiniteLossError naming the row's step and its offending values."""
        step = int(self.first_step[row].item())
        if step < 0:
            return
        self._raise(where, step, self.bad[row].tolist())

    def _raise(self, where: str, step: int, bad: list[bool]) -> None:
        names = [name for name, is_bad in zip(self.names, bad, strict=True) if is_bad]
        raise NonFiniteLossError(
            f"non-finite loss at step {step} (terms: {', '.join(names)}); training stopped "
            f"before saving; {where}. Try a lower --learning_rate or --mixed_precision bf16/no, "
            "and check the training photos"
        )


class RunningMeans:
    """Sums per-step value vectors on the device (one row per run); the host reads a row only
    on pop().

    `per_sample` values are averaged over the samples counted by the `count` value (a step
    without any such sample does not pull their mean towards 0); the others over steps.
    """

    def __init__(
        self,
        names: tuple[str, ...],
        device: Any,
        per_sample: tuple[str, ...] = (),
        count: str | None = None,
        rows: int = 1,
    ) -> None:
        import torch

        self.names = names
        self.count_index = names.index(count) if count is not None else None
        self.sums = torch.zeros(rows, len(names), dtype=torch.float64, device=device)
        self.sample_sums = torch.zeros(rows, len(per_sample), dtype=torch.float64, device=device)
        self.steps = torch.zeros(rows, dtype=torch.long, device=device)
        # index tensors on the device: a Python list index would sync
        self.per_sample = torch.tensor([names.index(n) for n in per_sample], device=device)

    def add(self, values: Any, index: Any = None) -> None:
        """values: (S, T) of rows `index` (S,), or (T,) of row 0."""
        import torch

        if index is None:
            values, index = values[None], torch.zeros(1, dtype=torch.long, device=values.device)
        self.sums.index_add_(0, index, values)
        if len(self.per_sample):
            counts = values[:, self.count_index, None]
            self.sample_sums.index_add_(0, index, values[:, self.per_sample] * counts)
        self.steps.index_add_(0, index, torch.ones_like(index))

    def reset(self, row: int = 0) -> None:
        self.sums[row] = 0
        self.sample_sums[row] = 0
        self.steps[row] = 0

    def means_of(self, rows: Any) -> Any:
        """(S, T) float64 on the device: the means pop() would give for rows (an index or a slice
        of S rows), without
        reading or resetting them (for one host read of many rows; reset each after)."""
        means = self.sums[rows] / self.steps[rows, None].clamp_min(1)
        if len(self.per_sample):
            samples = self.sums[rows, self.count_index, None].clamp_min(1)
            means[:, self.per_sample] = self.sample_sums[rows] / samples
        return means

    def pop(self, row: int = 0) -> dict[str, float]:
        """Means of a row since its last pop (one sync), then reset."""
        means = self.sums[row] / self.steps[row].clamp_min(1)
        if len(self.per_sample):
            samples = self.sums[row, self.count_index].clamp_min(1)
            means[self.per_sample] = self.sample_sums[row] / samples
        result = dict(zip(self.names, means.tolist(), strict=True))
        self.reset(row)
        return result


# ============================================================================ numeric flags


class Number:
    """argparse `type` of a numeric flag that also knows which values the flag accepts: finite,
    within [low, high] (open ends optional), a multiple of `multiple_of`. Parsing only converts;
    check_numbers checks every flag (defaults included) after parsing, with one message style."""

    def __init__(
        self,
        kind: type = float,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        high_open: bool = False,
        multiple_of: int | None = None,
    ) -> None:
        self.kind, self.low, self.high = kind, low, high
        self.low_open, self.high_open, self.multiple_of = low_open, high_open, multiple_of
        self.__name__ = kind.__name__  # argparse names the type in "invalid int value" errors

    def __call__(self, text: str) -> int | float:
        return self.kind(text)

    def problem(self, value: float) -> str | None:
        """Why `value` is not accepted, or None."""
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        too_low = self.low is not None and (
            value <= self.low if self.low_open else value < self.low
        )
        too_high = self.high is not None and (
            value >= self.high if self.high_open else value > self.high
        )
        if too_low or too_high:
            return f"must be {self.describe()}"
        if self.multiple_of and value % self.multiple_of:
            return f"must be a multiple of {self.multiple_of} and {self.describe()}"
        return None

    def describe(self) -> str:
        low = None if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        high = None if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        return " and ".join(part for part in (low, high) if part) or "a finite number"


POSITIVE_INT = Number(int, low=1)
NON_NEGATIVE_INT = Number(int, low=0)
SEED = Number(int, low=0, high=2**63 - 1)
POSITIVE = Number(float, low=0, low_open=True)
NON_NEGATIVE = Number(float, low=0)
FINITE = Number(float)
PROBABILITY = Number(float, low=0, high=1)
# Classifier-free guidance: SD is used at 1..15 (paper: 5); past 100 images only saturate.
GUIDANCE_SCALE = Number(float, low=0, high=100)


def check_numbers(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """ValueError '--flag must be ..., got v' for the first numeric flag out of its range."""
    for action in parser._actions:
        if not isinstance(action.type, Number):
            continue
        value = getattr(args, action.dest)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            problem = None if item is None else action.type.problem(item)
            if problem:
                raise ValueError(f"--{action.dest} {problem}, got {item}")


def unchecked_numeric_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Flags parsed as plain int / float, i.e. without a Number range (tests forbid them)."""
    return [action.dest for action in parser._actions if action.type in (int, float)]
