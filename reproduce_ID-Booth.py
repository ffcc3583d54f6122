"""The paper's experiment in one command: train every identity x variant, generate, evaluate.

Given identity photos (ROOT/<identity>/*), the base model and ArcFace weights, it runs the
three scripts' own code in order (no second implementation):

1. train_ID-Booth.py once per variant (default: dreambooth, identity, triplet; the class images
   of --class_data_dir are sampled by the first and reused by the others) -> OUT/loras/<variant>;
2. inference_ID-Booth.py per variant with the paper's generation settings
   -> OUT/generated/<variant>/<identity>/<i>.png;
3. with --fr_benchmarks DIR (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW .bin files), the paper's
   face-recognition utility: Evaluation/train_fr.py per data setting (real, synthetic and
   real + synthetic per variant, the official protocol) and verification on every benchmark
   -> OUT/fr_utility/fr_utility.json (Evaluation/fr_utility.py);
4. Evaluation/evaluate.py on every variant side by side against the real photos, with each
   variant's training curves and the FR-utility table -> OUT/report/report.html + metrics.json.

Every stage skips what is done (finished identities, images on disk; evaluation re-reads its
caches), and training resumes an identity from its last checkpoint, so a killed run re-run
finishes the rest. The experiment's own settings are kept in OUT/experiment_config.json,
written once every variant's training has finished (a run that fails before records nothing):
a re-run with other training or generation settings is refused with the differences listed
(--overwrite retrains and regenerates everything with the new ones), so a report is never
rebuilt from models of other settings. The evaluation's and the FR utility's flags may
change. Variants share --seed, so their LoRAs start from the same init and see the same data
order and noise: a paired comparison.

    accelerate launch --num_processes 8 reproduce_ID-Booth.py \\
        --identities_root data/tufts --class_data_dir data/class_person \\
        --identity_attributes genders.csv \\
        --arcface_weights ms1mv3_arcface_r100_fp16/backbone.pth --output_dir experiment

Under `accelerate launch` (or torchrun) each stage splits its work over the processes; the
evaluation runs on the main process. Stage-specific flags go through --train_flags,
--generate_flags and --evaluate_flags (appended last; a flag this command sets itself, such as
--output_dir, is refused there, naming the flag of this command to use). They are compared as
the settings they parse to: '--x=4' and '--x 4', in any order, are the same settings.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import re
import shlex
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import runs
from fileio import atomic_write_json

logger = logging.getLogger("reproduce_ID-Booth")

REPO_ROOT = Path(__file__).resolve().parent
VARIANTS = ("dreambooth", "identity", "triplet")
STAGE_SCRIPTS = {
    "train": REPO_ROOT / "train_ID-Booth.py",
    "generate": REPO_ROOT / "inference_ID-Booth.py",
    "evaluate": REPO_ROOT / "Evaluation" / "evaluate.py",
}
EXPERIMENT_CONFIG_NAME = "experiment_config.json"
# Arguments a re-run may change, decided flag by flag by whether the results of finished
# training and generation depend on it; every other argument, one added later included, must
# match:
#   may change: output_dir, overwrite (where, and whether to redo); variants (each variant's
#     LoRAs and images are checked by its own stages); identities_root, class_data_dir,
#     arcface_weights (paths whose content training compares: photos, class images, weights);
#     real, embedder, feature_model, quality_weights, quality_setting, pose_weights, banner,
#     evaluate_flags (the evaluation, recomputed every run); fr_benchmarks, fr_settings,
#     fr_selection_benchmarks, fr_flags (the FR utility, a later evaluation: each train_fr.py
#     run lives in a folder keyed by its flags and data, and the table is rebuilt every run).
#   must match: pretrained_model_name_or_path, resolution (both stages); face_detector (the
#     training photos' landmarks); identity_attributes (the prompts' genders);
#     num_images_per_identity (the image set the report reads); train_flags and
#     generate_flags, compared as the settings they parse to (stage_settings).
EXPERIMENT_MAY_CHANGE = frozenset(
    "output_dir overwrite variants identities_root class_data_dir arcface_weights "  # noqa: SIM905
    "real embedder feature_model quality_weights quality_setting pose_weights banner "
    "evaluate_flags fr_benchmarks fr_settings fr_selection_benchmarks fr_flags".split()
)
# Flags of each stage that this command sets from its own (stage dest -> the flag to use
# instead): --STAGE_flags may not set them, or the stages would disagree with the experiment.
MANAGED_FLAGS = {
    "train": {
        "pretrained_model_name_or_path": "--pretrained_model_name_or_path",
        "instance_data_dir": "--identities_root",
        "identities_root": "--identities_root",
        "class_data_dir": "--class_data_dir",
        "arcface_weights": "--arcface_weights",
        "face_detector": "--face_detector",
        "loss": "--variants",
        "resolution": "--resolution",
        "output_dir": "--output_dir",
        "overwrite": "--overwrite",
        "resume_from_checkpoint": "--overwrite (without it every identity resumes from its "
        "latest checkpoint)",
    },
    "generate": {
        "pretrained_model_name_or_path": "--pretrained_model_name_or_path",
        "lora_dir": "--output_dir (the LoRAs are OUTPUT_DIR/loras/<variant>)",
        "lora_root": "--output_dir (the LoRAs are OUTPUT_DIR/loras/<variant>)",
        "output_dir": "--output_dir",
        "num_images_per_identity": "--num_images_per_identity",
        "resolution": "--resolution",
        "identity_attributes": "--identity_attributes",
        "overwrite": "--overwrite",
    },
    "evaluate": {
        "generated": "--variants and --output_dir",
        "training_logs": "--output_dir",
        "real": "--real",
        "out": "--output_dir",
        "face_detector": "--face_detector",
        "embedder": "--embedder",
        "feature_model": "--feature_model",
        "arcface_weights": "--arcface_weights",
        "quality_weights": "--quality_weights",
        "quality_setting": "--quality_setting",
        "pose_weights": "--pose_weights",
        "banner": "--banner",
        "fr_utility": "--fr_benchmarks",
    },
    "fr": {  # train_fr.py's option strings (its parser is built inside its parse_args)
        "--data_dir": "--real and --variants",
        "--output_dir": "--output_dir",
        "--eval_bin": "--fr_benchmarks and --fr_selection_benchmarks",
        "--face_detector": "--face_detector",
        "--resume_from_checkpoint": "--output_dir (each setting resumes its own run)",
    },
}


class StageError(RuntimeError):
    """A stage finished with failures (named in the message); finished work is kept."""


def build_parser() -> argparse.ArgumentParser:
    parser = runs.argument_parser(__doc__)
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default="stabilityai/stable-diffusion-2-1-base",
        help="Base Stable Diffusion model (hub id or local folder).",
    )
    parser.add_argument(
        "--identities_root", type=Path, required=True, help="ROOT/<identity>/<photos>."
    )
    parser.add_argument(
        "--class_data_dir",
        type=Path,
        required=True,
        help="Prior (class) images; missing ones are sampled once, by the first variant.",
    )
    parser.add_argument(
        "--arcface_weights",
        type=Path,
        required=True,
        help="arcface_torch backbone.pth or ONNX recogniser: the identity loss, the photos' "
        "face annotation (every variant trains on the same photos) and, with --embedder "
        "arcface, the evaluation.",
    )
    parser.add_argument(
        "--identity_attributes",
        type=Path,
        default=None,
        help="CSV/JSON of each identity's gender for the paper's prompts (inference_ID-Booth.py).",
    )
    parser.add_argument("--output_dir", type=Path, required=True, help="The experiment folder.")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=VARIANTS,
        help="Training losses to compare (each is one --loss of train_ID-Booth.py).",
    )
    parser.add_argument(
        "--resolution",
        type=runs.Number(int, low=8, multiple_of=8),
        default=None,
        help="Training and generation size (default: the base model's native size, read from "
        "its configs: 512 for SD 1.5 / 2.1-base, 768 for SD 2.1, 1024 for SDXL).",
    )
    parser.add_argument(
        "--num_images_per_identity",
        type=runs.POSITIVE_INT,
        default=21,
        help="Images per identity and variant (paper: 21 for evaluation, 100 for FR training).",
    )
    parser.add_argument(
        "--face_detector",
        default="auto",
        help="Face detector of training and evaluation (see train_ID-Booth.py).",
    )
    parser.add_argument(
        "--real",
        type=Path,
        default=None,
        help="Real photos the evaluation compares with; default: --identities_root.",
    )
    parser.add_argument(
        "--embedder",
        default="arcface",
        choices=("arcface", "dlib"),
        help="Evaluation's identity embedder (arcface: --arcface_weights, the paper's).",
    )
    parser.add_argument(
        "--feature_model",
        default="facebook/dinov2-large",
        help="DINOv2 model of the diversity and fidelity metrics (dgm-eval's): a hub id or a "
        "local folder saved with save_pretrained; 'none' skips those metrics.",
    )
    parser.add_argument(
        "--quality_weights",
        type=Path,
        default=None,
        help="CR-FIQA checkpoint for the quality section (not given: not computed); the "
        "paper's is CR-FIQA(S), 32572backbone.pth.",
    )
    parser.add_argument(
        "--quality_setting",
        default="paper",
        help="CR-FIQA protocol (evaluate.py's): paper = CR-FIQA(S) fed BGR, as the paper "
        "scored; crfiqa-rgb = CR-FIQA's own RGB protocol.",
    )
    parser.add_argument(
        "--pose_weights",
        type=Path,
        default=None,
        help="6DRepNet weights (6DRepNet_300W_LP_AFLW2000.pth), the paper's pose estimator; "
        "not given: the offline dlib-PnP fallback, not comparable with the paper.",
    )
    parser.add_argument("--banner", default=None, help="A note shown on top of the report.")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Accept settings other than those the experiment folder was made with: retrain "
        "every identity and regenerate every image (passed to both stages).",
    )
    add_fr_utility_args(parser)
    for stage, example in FLAG_EXAMPLES.items():
        parser.add_argument(
            f"--{stage}_flags",
            default="",
            help=f"Extra flags of {STAGE_SCRIPTS[stage].name} (see its --help), one "
            f"shell-quoted string, checked before any work starts (e.g. {example}).",
        )
    runs.group_flags(parser, HELP_GROUPS)
    return parser


HELP_GROUPS = {  # --help sections (display only; a flag not listed shows under "options")
    "inputs and models": [
        "pretrained_model_name_or_path", "identities_root", "class_data_dir", "arcface_weights",
        "identity_attributes", "face_detector",
    ],
    "experiment": ["variants", "resolution", "num_images_per_identity"],
    "stage flags": ["train_flags", "generate_flags", "evaluate_flags"],
    "evaluation": [
        "real", "embedder", "feature_model", "quality_weights", "quality_setting",
        "pose_weights", "banner",
    ],
    "face-recognition utility": [
        "fr_benchmarks", "fr_settings", "fr_selection_benchmarks", "fr_flags",
    ],
    "output": ["output_dir", "overwrite"],
}  # fmt: skip


def add_fr_utility_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the face-recognition utility stage (Evaluation/fr_utility.py)."""
    parser.add_argument(
        "--fr_benchmarks",
        type=Path,
        default=None,
        help="Folder of insightface verification .bin files (lfw, cfp_fp, agedb_30, calfw, "
        "cplfw): train an FR model per data setting and report its accuracy on each. Not "
        "given: the report says what the FR-utility table needs.",
    )
    parser.add_argument(
        "--fr_settings",
        nargs="+",
        default=["real", "synthetic", "real+synthetic"],
        choices=("real", "synthetic", "real+synthetic"),
        help="Training data of the FR models: the real photos (--real), each variant's "
        "images, and both merged by identity (the paper's three).",
    )
    parser.add_argument(
        "--fr_selection_benchmarks",
        nargs="+",
        default=None,
        help="Benchmarks (.bin stems) whose mean accuracy selects the checkpoint, drives the lr "
        "plateau and the early stop; default lfw (the official setting) if present, else all.",
    )
    parser.add_argument(
        "--fr_flags",
        default="",
        help="Extra flags of Evaluation/train_fr.py (see its --help), one shell-quoted string, "
        "checked before any work starts when --fr_benchmarks is given (e.g. --fr_flags "
        "'--num_epochs 2').",
    )


FLAG_EXAMPLES = {
    "train": "--train_flags '--max_train_steps 3200 --pack 4'",
    "generate": "--generate_flags '--batch_size 8 --scheduler ddim'",
    "evaluate": "--evaluate_flags=--no-pose",
}


def join_flag_values(argv: list[str]) -> list[str]:
    """'--evaluate_flags --no-pose' as '--evaluate_flags=--no-pose': argparse would take a
    value that starts with '-' for a flag of its own and refuse it."""
    joined, tokens = [], iter(argv)
    for token in tokens:
        if token in {f"--{stage}_flags" for stage in (*STAGE_SCRIPTS, "fr")}:
            value = next(tokens, None)
            joined.append(token if value is None else f"{token}={value}")
        else:
            joined.append(token)
    return joined


def check_stage_flag_tokens(argv: list[str]) -> None:
    """ValueError for a --STAGE_flags given twice: argparse keeps the last one silently."""
    for stage in (*STAGE_SCRIPTS, "fr"):
        flag = f"--{stage}_flags"
        if sum(token.split("=", 1)[0] == flag for token in argv) > 1:
            raise ValueError(f"{flag} is given twice; put all its flags in one quoted value")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, then check everything that needs no model before any stage starts: the folders,
    each stage's flags with its own parser, the base model, the identities' genders."""
    import sys

    parser = build_parser()
    argv = join_flag_values(sys.argv[1:] if argv is None else list(argv))
    check_stage_flag_tokens(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:  # most often the rest of an unquoted --STAGE_flags value
        raise ValueError(
            f"unrecognized arguments: {shlex.join(extra)}; a stage's flags go in one quoted "
            "value, e.g. --train_flags='--max_train_steps 6 --checkpointing_steps 6'"
        )
    runs.check_numbers(args, parser)
    args.variants = list(dict.fromkeys(args.variants))
    args.real = args.real or args.identities_root
    if args.resolution is None:  # the base's native size (architectures.py), recorded
        from architectures import architecture_or_paper

        args.resolution = architecture_or_paper(args.pretrained_model_name_or_path).resolution
    for stage in (*STAGE_SCRIPTS, "fr"):
        setattr(args, f"{stage}_flags", shlex.split(getattr(args, f"{stage}_flags")))
    if not args.identities_root.is_dir():
        raise FileNotFoundError(f"--identities_root {args.identities_root} is not a folder")
    if args.identity_attributes is not None and not args.identity_attributes.is_file():
        raise FileNotFoundError(f"--identity_attributes file {args.identity_attributes} not found")
    stage_args = {stage: parse_stage_flags(args, stage) for stage in STAGE_SCRIPTS}
    runs.check_base_model(args.pretrained_model_name_or_path)
    check_stage_inputs(stage_args)
    check_genders(args, stage_args["generate"])
    check_fr_utility_args(args)
    return args


def stage_argv(args: argparse.Namespace, stage: str) -> list[str]:
    """A stage's command line (the first variant's, for training)."""
    if stage == "train":
        return train_argv(args, args.variants[0])
    if stage == "generate":
        return generate_argv(args, args.variants[0])
    return evaluate_argv(args)


def stage_parser(stage: str) -> argparse.ArgumentParser:
    """A stage's own parser, raising ValueError where argparse would print usage and exit."""
    parser = runs.load_script(STAGE_SCRIPTS[stage]).build_parser()
    parser.error = partial(_refuse, parser)
    return parser


def without_stage_flags(args: argparse.Namespace, stage: str) -> argparse.Namespace:
    """A copy of args whose --STAGE_flags are empty: the part of a stage's command line that
    this command builds from its own flags."""
    return argparse.Namespace(**{**vars(args), f"{stage}_flags": []})


def check_managed_flags(flags: list[str], stage: str, options: dict[str, str]) -> None:
    """ValueError naming this command's flag for a --STAGE_flags flag that it sets itself
    (options: the stage's option string -> the flag to use instead)."""
    for token in flags:
        option = token.split("=", 1)[0]
        if option in options:
            raise ValueError(
                f"--{stage}_flags: {option} is set by this command; use {options[option]} instead"
            )


def managed_options(stage: str, parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every option string of the stage's managed flags (--no-x too) -> the flag to use."""
    managed = MANAGED_FLAGS[stage]
    return {
        option: managed[action.dest]
        for option, action in parser._option_string_actions.items()
        if action.dest in managed
    }


def parse_stage_flags(args: argparse.Namespace, stage: str) -> argparse.Namespace:
    """A stage's command line through that stage's own parser and numeric ranges (no file
    checks: the stage's inputs do not exist yet). The part this command builds is parsed first,
    so its errors name this command's flags; errors of the --STAGE_flags name those."""
    parser = stage_parser(stage)
    flags = getattr(args, f"{stage}_flags")
    check_managed_flags(flags, stage, managed_options(stage, parser))
    script_name = STAGE_SCRIPTS[stage].relative_to(REPO_ROOT)
    try:
        _parse_checked(parser, stage_argv(without_stage_flags(args, stage), stage))
    except ValueError as error:
        raise ValueError(f"{error} ({script_name} refuses what this command passes it)") from None
    try:
        return _parse_checked(parser, stage_argv(args, stage))
    except ValueError as error:
        raise ValueError(
            f"--{stage}_flags {shlex.join(flags)!r}: {error} (python {script_name} --help lists "
            "them)"
        ) from None


def _parse_checked(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    parsed = parser.parse_args(argv)
    runs.check_numbers(parsed, parser)
    return parsed


def stage_settings(args: argparse.Namespace, stage: str) -> dict[str, Any]:
    """What the --STAGE_flags set: the stage's parsed arguments that this command does not
    manage and that differ from the stage's defaults. '--x=4' and '--x 4', any order, and a
    default spelt out all give the same settings, so only a real change counts as one."""
    parser = stage_parser(stage)
    parsed = vars(parser.parse_args(stage_argv(args, stage)))
    return {
        dest: value
        for dest, value in sorted(parsed.items())
        if dest not in MANAGED_FLAGS[stage] and value != parser.get_default(dest)
    }


def check_stage_inputs(stage_args: dict[str, argparse.Namespace]) -> None:
    """The stages' own cheap input checks, now rather than when the stage starts: training's
    identity folders (photos one level too deep, a folder above the identities) and the
    evaluation's feature model (offline and not cached), which is loaded last, after hours."""
    train = runs.load_script(STAGE_SCRIPTS["train"])
    train.validate_data(stage_args["train"])
    features = runs.load_script(REPO_ROOT / "Evaluation" / "features.py")
    features.check_feature_model(stage_args["evaluate"].feature_model)
    # Generation's own value checks (scheduler name, templates, backgrounds file, attributes
    # file): a typo there would otherwise surface after every training, already recorded.
    generate = runs.load_script(STAGE_SCRIPTS["generate"])
    generate_args = argparse.Namespace(**vars(stage_args["generate"]))
    generate_args.backgrounds = generate.resolve_backgrounds(generate_args.backgrounds)
    generate.validate_args(generate_args)


def check_genders(args: argparse.Namespace, generate_args: argparse.Namespace) -> None:
    """Every identity folder has a gender for the prompts when the template uses {gender}
    (ValueError listing those without), so a bad attributes file fails before any training."""
    from datasets import identity_genders
    from prompts import template_placeholders

    templates = (generate_args.prompt_template, generate_args.prompt_template_no_background)
    if not any("gender" in template_placeholders(template) for template in templates):
        return
    loras = loras_of(args, args.variants[0])
    folders = {path.name: loras / path.name for path in runs.identity_folders(args.identities_root)}
    attributes = generate_args.identity_attributes
    identity_genders(folders, None if attributes is None else Path(attributes))


def check_fr_utility_args(args: argparse.Namespace) -> None:
    """Bad FR-utility input fails now, not after hours of training and generation: the .bin
    folder, the selection names, and train_fr.py's parsing of the stage's flags."""
    check_managed_flags(args.fr_flags, "fr", MANAGED_FLAGS["fr"])
    if args.fr_benchmarks is None:
        return
    fr_utility = runs.load_script(REPO_ROOT / "Evaluation" / "fr_utility.py")
    benchmarks = fr_utility.find_benchmarks(args.fr_benchmarks)
    selection = fr_utility.selection_benchmarks(benchmarks, args.fr_selection_benchmarks)
    train_fr = runs.load_script(REPO_ROOT / "Evaluation" / "train_fr.py")
    argv = [
        f"--data_dir={args.real}",
        f"--output_dir={fr_utility_table(args).parent}",
        *[f"--eval_bin={benchmarks[name]}" for name in selection],
        *fr_utility.OFFICIAL_PROTOCOL_FLAGS,
        *args.fr_flags,
    ]
    try:  # train_fr.py builds its parser inside parse_args: its error() would print and exit
        with mock.patch.object(argparse.ArgumentParser, "error", _refuse):
            train_fr.parse_args(argv)
    except ValueError as error:
        raise ValueError(
            f"--fr_flags {shlex.join(args.fr_flags)!r}: {error} "
            "(python Evaluation/train_fr.py --help lists them)"
        ) from None


def _refuse(parser: argparse.ArgumentParser, message: str) -> None:
    """ArgumentParser.error as an exception: a stage's flags are refused by this command."""
    raise ValueError(message)


# ------------------------------------------------------------------------------ stages


def loras_of(args: argparse.Namespace, variant: str) -> Path:
    return args.output_dir / "loras" / variant


def images_of(args: argparse.Namespace, variant: str) -> Path:
    return args.output_dir / "generated" / variant


def resolution_flag(args: argparse.Namespace) -> list[str]:
    """--resolution for the stages when given; else each reads the base model's own."""
    return [f"--resolution={args.resolution}"] if args.resolution is not None else []


def train_argv(args: argparse.Namespace, variant: str) -> list[str]:
    """train_ID-Booth.py's command line for one variant; resumes unfinished identities."""
    return [
        f"--pretrained_model_name_or_path={args.pretrained_model_name_or_path}",
        f"--identities_root={args.identities_root}",
        f"--class_data_dir={args.class_data_dir}",
        f"--arcface_weights={args.arcface_weights}",
        f"--face_detector={args.face_detector}",
        f"--loss={variant}",
        *resolution_flag(args),
        f"--output_dir={loras_of(args, variant)}",
        "--overwrite" if args.overwrite else "--resume_from_checkpoint=latest",
        *args.train_flags,
    ]


def generate_argv(args: argparse.Namespace, variant: str) -> list[str]:
    """inference_ID-Booth.py's command line for one variant (the paper's settings)."""
    attributes = []
    if args.identity_attributes is not None:
        attributes = [f"--identity_attributes={args.identity_attributes}"]
    return [
        f"--pretrained_model_name_or_path={args.pretrained_model_name_or_path}",
        f"--lora_root={loras_of(args, variant)}",
        f"--output_dir={images_of(args, variant)}",
        f"--num_images_per_identity={args.num_images_per_identity}",
        *resolution_flag(args),
        *attributes,
        *(["--overwrite"] if args.overwrite else []),
        *args.generate_flags,
    ]


def evaluate_argv(args: argparse.Namespace) -> list[str]:
    """Evaluation/evaluate.py's command line: every variant side by side."""
    argv = [f"--generated={variant}={images_of(args, variant)}" for variant in args.variants]
    argv += [f"--training_logs={variant}={loras_of(args, variant)}" for variant in args.variants]
    argv += [
        f"--real={args.real}",
        f"--out={args.output_dir / 'report'}",
        f"--face_detector={args.face_detector}",
        f"--embedder={args.embedder}",
        f"--feature_model={args.feature_model}",
    ]
    if args.embedder == "arcface":
        argv.append(f"--arcface_weights={args.arcface_weights}")
    if args.quality_weights is not None:
        argv.append(f"--quality_weights={args.quality_weights}")
        argv.append(f"--quality_setting={args.quality_setting}")
    if args.pose_weights is not None:
        argv.append(f"--pose_weights={args.pose_weights}")
    if args.banner:
        argv.append(f"--banner={args.banner}")
    if args.fr_benchmarks is not None:
        argv.append(f"--fr_utility={fr_utility_table(args)}")
    return [*argv, *args.evaluate_flags]


def run_stage(name: str, argv: list[str]) -> Any:
    """One script's main on its own parsed command line, in this process."""
    script = runs.load_script(STAGE_SCRIPTS[name])
    logger.info("%s: %s %s", name, STAGE_SCRIPTS[name].name, shlex.join(argv))
    try:
        return script.main(script.parse_args(argv))
    except (ValueError, OSError) as error:
        message = in_reproduce_terms(str(error), name, script.build_parser())
        raise StageError(f"{STAGE_SCRIPTS[name].name}: {message}") from error
    finally:
        free_device_memory()


def in_reproduce_terms(message: str, stage: str, stage_parser: argparse.ArgumentParser) -> str:
    """A stage's error with its own flags as this command spells them: '--overwrite' ->
    '--train_flags=--overwrite' (flags reproduce has itself are left as they are)."""
    own = {option for action in build_parser()._actions for option in action.option_strings}
    theirs = {option for action in stage_parser._actions for option in action.option_strings}

    def translate(match: re.Match) -> str:
        flag = match.group(0)
        return f"--{stage}_flags={flag}" if flag in theirs - own else flag

    return re.sub(r"(?<![\w=-])--[A-Za-z][\w-]*", translate, message)


def free_device_memory() -> None:
    """Drop what a finished stage left cached on the GPU before the next loads its models."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def stop_if_failed(state: Any, stage: str, failed: list[str]) -> None:
    """StageError on every process when any process had failures (so none waits forever)."""
    from accelerate.utils import gather_object

    everyone = sorted(gather_object(failed)) if state.num_processes > 1 else sorted(failed)
    if everyone:
        raise StageError(
            f"{stage}: {len(everyone)} failed ({', '.join(everyone[:10])}); their errors are "
            "logged above. Fix them and re-run: finished identities and images are kept"
        )


def variant_context(args: argparse.Namespace, stage: str, variant: str) -> None:
    """Every progress line of the stage says which variant it is in ('variant 2 of 3')."""
    position = args.variants.index(variant) + 1
    text = f"{stage} variant {position} of {len(args.variants)} ({variant})"
    runs.set_progress_context(text)
    logger.info("%s", text)


def train_variants(args: argparse.Namespace, state: Any) -> None:
    for variant in args.variants:
        variant_context(args, "training", variant)
        summary = run_stage("train", train_argv(args, variant))
        failed = [f"{variant}/{result['identity']}" for result in summary["failed"]]
        stop_if_failed(state, f"training {variant}", failed)
    state.wait_for_everyone()  # every variant's LoRAs exist before any generation starts


def generate_variants(args: argparse.Namespace, state: Any) -> None:
    for variant in args.variants:
        variant_context(args, "generating", variant)
        summary = run_stage("generate", generate_argv(args, variant))
        # The summary holds the totals over all processes, so every process stops alike.
        failed = [f"{variant}/{name}" for name in summary["failed_identities"]]
        if summary["failed"] and not failed:  # e.g. images flagged by a safety checker
            failed = [f"{summary['failed']} images of {variant}"]
        if failed:
            raise StageError(
                f"generating {variant}: {', '.join(failed[:10])} failed; their errors are "
                "logged above. Fix them and re-run: finished images are kept"
            )


def fr_utility_table(args: argparse.Namespace) -> Path:
    return args.output_dir / "fr_utility" / "fr_utility.json"


def fr_utility_stage(args: argparse.Namespace, state: Any) -> None:
    """The paper's FR-utility table: train_fr.py per data setting (official protocol, then
    --fr_flags), verified on every --fr_benchmarks set; a failed setting is a row saying why."""
    if args.fr_benchmarks is None:
        return
    fr_utility = runs.load_script(REPO_ROOT / "Evaluation" / "fr_utility.py")
    generated = {variant: images_of(args, variant) for variant in args.variants}
    settings = fr_utility.paper_settings(args.real, generated, args.fr_settings)
    flags = [
        *fr_utility.OFFICIAL_PROTOCOL_FLAGS,
        f"--face_detector={args.face_detector}",
        *args.fr_flags,
    ]
    try:
        fr_utility.run_fr_utility(
            settings,
            args.fr_benchmarks,
            fr_utility_table(args).parent,
            flags,
            args.fr_selection_benchmarks,
            is_main_process=state.is_main_process,
        )
    finally:
        free_device_memory()
    state.wait_for_everyone()


def experiment_config(args: argparse.Namespace) -> dict[str, Any]:
    """OUT/experiment_config.json: the arguments, each --STAGE_flags as the settings it
    parses to (stage_settings, not its text), and the library versions."""
    recorded = {**vars(args)}
    for stage in STAGE_SCRIPTS:
        recorded[f"{stage}_flags"] = stage_settings(args, stage)
    return {"args": runs.json_safe(recorded), "versions": runs.library_versions()}


def comparable_args(recorded: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """A config's arguments with each --STAGE_flags that must match split into one entry per
    setting ('train_flags --learning_rate'). A config written before the settings were kept
    parsed holds the flags' text: it is parsed now, with this run's other arguments."""
    flat = dict(recorded)
    for stage in STAGE_SCRIPTS:
        key = f"{stage}_flags"
        value = flat.pop(key, {})
        if key in EXPERIMENT_MAY_CHANGE:
            continue
        if isinstance(value, list):
            value = settings_of_text(args, stage, value)
        if not isinstance(value, dict):
            value = {"(as written)": value}
        for dest, item in value.items():
            flat[f"{key} {dest}" if dest.startswith("(") else f"{key} --{dest}"] = item
    return flat


def settings_of_text(args: argparse.Namespace, stage: str, flags: list[str]) -> dict[str, Any]:
    """stage_settings of --STAGE_flags text from an old config; text the stage no longer
    parses is kept as written (it then differs from any parsed settings)."""
    try:
        old = argparse.Namespace(**{**vars(args), f"{stage}_flags": [str(f) for f in flags]})
        return runs.json_safe(stage_settings(old, stage))
    except ValueError:
        return {"(as written)": shlex.join(str(flag) for flag in flags)}


def check_no_departed_identities(args: argparse.Namespace) -> None:
    """ValueError when OUT holds LoRAs or images of an identity that --identities_root no
    longer has: the report evaluates whole variant folders, so they would enter it silently."""
    current = {path.name for path in runs.identity_folders(args.identities_root)}
    folders = [made(args, v) for made in (loras_of, images_of) for v in args.variants]
    for folder in folders:
        if not folder.is_dir():
            continue
        departed = sorted({path.name for path in runs.identity_folders(folder)} - current)
        if departed:
            shown = ", ".join(departed[:5]) + (" ..." if len(departed) > 5 else "")
            raise ValueError(
                f"{folder} holds {runs.plural(len(departed), 'identity')} that "
                f"--identities_root {args.identities_root} no longer has ({shown}); they would "
                "enter the report: move them out of --output_dir, or restore their photos"
            )


def check_experiment(args: argparse.Namespace, state: Any) -> None:
    """Refuse (ValueError listing the differences) a re-run whose settings differ from those
    in OUT/experiment_config.json, unless --overwrite. The file is written later, by
    record_experiment, once the run has finished work under its settings."""
    path = args.output_dir / EXPERIMENT_CONFIG_NAME
    if path.is_file() and not args.overwrite:
        try:
            saved = json.loads(path.read_text())["args"]
            saved = comparable_args(saved, args)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"{path} is unreadable ({error}); pass --overwrite to redo the experiment"
            ) from error
        current = comparable_args(experiment_config(args)["args"], args)
        changed = runs.config_mismatches(saved, current, EXPERIMENT_MAY_CHANGE)
        if changed:
            loras = loras_of(args, args.variants[0])
            raise ValueError(
                f"{args.output_dir} holds an experiment made with other settings "
                f"({'; '.join(changed)}); re-run with those, use another --output_dir, or pass "
                "--overwrite to retrain and regenerate everything (to only make other images "
                f"from the trained LoRAs: inference_ID-Booth.py --lora_root {loras} "
                "--output_dir NEW_FOLDER)"
            )
    state.wait_for_everyone()  # every process has compared before the file can change


def record_experiment(args: argparse.Namespace, state: Any) -> None:
    """Write OUT/experiment_config.json once every variant's training finished without a
    failure: from then on the folder holds results of these settings. A run that fails before
    (a stage's checks, a failed identity) records nothing, so its corrected re-run is not
    refused as 'other settings'; what it did finish is guarded by the stages' own checks
    (training compares each finished identity and checkpoint by resume's rule)."""
    if state.is_main_process:
        atomic_write_json(args.output_dir / EXPERIMENT_CONFIG_NAME, experiment_config(args))
    state.wait_for_everyone()


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train, generate, evaluate; the report's path and the metrics on the main process."""
    state = runs.process_state()
    runs.setup_logging(state)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    check_experiment(args, state)
    check_no_departed_identities(args)
    train_variants(args, state)
    record_experiment(args, state)
    generate_variants(args, state)
    fr_utility_stage(args, state)
    runs.set_progress_context("")
    if not state.is_main_process:
        return {}
    results = run_stage("evaluate", evaluate_argv(args))
    report = args.output_dir / "report" / "report.html"
    logger.info(
        "summary: LoRAs in %s/<variant>/<identity>/, images in %s/<variant>/<identity>/, "
        "report %s (variants: %s)",
        args.output_dir / "loras",
        args.output_dir / "generated",
        report,
        ", ".join(args.variants),
    )
    return {"report": str(report), "metrics": results}


if __name__ == "__main__":
    runs.run_cli("reproduce_ID-Booth.py", parse_args, main, errors=(StageError,))
