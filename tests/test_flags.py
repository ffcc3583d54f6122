"""Every numeric flag of every script has a range, and a value outside it is refused right after
parsing with one clear message (never a run that trains uphill or writes NaN metadata)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from conftest import REPO_ROOT

import runs

SCRIPTS = {
    "train": REPO_ROOT / "train_ID-Booth.py",
    "inference": REPO_ROOT / "inference_ID-Booth.py",
    "evaluate": REPO_ROOT / "Evaluation" / "evaluate.py",
    "train_fr": REPO_ROOT / "Evaluation" / "train_fr.py",
    "verify": REPO_ROOT / "Evaluation" / "verify.py",
    "reproduce": REPO_ROOT / "reproduce_ID-Booth.py",
    "demo": REPO_ROOT / "demo.py",
}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"flags_{name}", SCRIPTS[name])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _parser(name: str):
    module = _script(name)
    if hasattr(module, "build_parser"):
        return module.build_parser()
    # Scripts that build their parser inside parse_args: capture it on the way.
    captured = []
    original = runs.check_numbers

    def capture(args, parser):
        captured.append(parser)
        raise SystemExit(0)

    runs.check_numbers = capture
    try:
        with pytest.raises(SystemExit):
            module.parse_args(_minimal_argv(name))
    finally:
        runs.check_numbers = original
    return captured[0]


def _minimal_argv(name: str) -> list[str]:
    return {
        "evaluate": ["--generated=a", "--out=o"],
        "train_fr": ["--data_dir=d", "--output_dir=o"],
        "verify": ["--backbone=b.pth", "--bin=lfw.bin"],
        "demo": [],
    }[name]


def _bad_values(number: runs.Number) -> list[str]:
    """Values the flag must refuse: non-finite, and just outside each end of its range."""
    bad = ["nan", "inf", "-inf"] if number.kind is float else []
    if number.low is not None:
        bad.append(str(number.kind(number.low) - (0 if number.low_open else 1)))
    if number.high is not None:
        bad.append(str(number.kind(number.high) + (0 if number.high_open else 1)))
    if number.multiple_of:
        bad.append(str(number.multiple_of * 10 + 1))
    return bad


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_numeric_flag_has_a_range_and_refuses_values_outside_it(name):
    parser = _parser(name)
    assert runs.unchecked_numeric_flags(parser) == [], f"{name}: numeric flags without a range"
    numbers = [a for a in parser._actions if isinstance(a.type, runs.Number)]
    assert numbers, name
    defaults = parser.parse_args(_required(parser))
    runs.check_numbers(defaults, parser)  # every default is inside its range
    for action in numbers:
        for value in _bad_values(action.type):
            args = parser.parse_args([*_required(parser), f"{action.option_strings[0]}={value}"])
            with pytest.raises(ValueError, match=f"--{action.dest} must be"):
                runs.check_numbers(args, parser)


def _required(parser) -> list[str]:
    """Placeholder values for the required flags (the numbers are checked on their own)."""
    argv = []
    for action in parser._actions:
        if action.required:
            argv.append(f"{action.option_strings[0]}=placeholder")
    group_flags = {
        action.option_strings[0]
        for group in parser._mutually_exclusive_groups
        if group.required
        for action in group._group_actions[:1]
    }
    return argv + [f"{flag}=placeholder" for flag in sorted(group_flags)]


@pytest.mark.parametrize(
    "name, argv, message",
    [
        ("train", ["--instance_data_dir=x", "--max_grad_norm=-1"], "--max_grad_norm must be > 0"),
        ("train", ["--instance_data_dir=x", "--checkpoints_total_limit=-1"], "must be >= 1"),
        ("inference", ["--lora_dir=x", "--output_dir=o", "--guidance_scale=nan"], "finite"),
        ("inference", ["--lora_dir=x", "--output_dir=o", "--lora_scale=-inf"], "finite"),
        ("evaluate", ["--generated=a", "--out=o", "--fmr_targets", "1e-3", "1"], "fmr_targets"),
        ("train_fr", ["--data_dir=d", "--output_dir=o", "--learning_rate=inf"], "learning_rate"),
        ("verify", ["--backbone=b.pth", "--bin=lfw.bin", "--num_folds=1"], "num_folds"),
    ],
)
def test_scripts_refuse_bad_numbers_while_parsing(name, argv, message):
    with pytest.raises(ValueError, match=message):
        _script(name).parse_args(argv)


HELP_SCRIPTS = {**SCRIPTS, "export_faces": REPO_ROOT / "Evaluation" / "export_faces.py"}


@pytest.mark.parametrize(
    "name", ["train", "inference", "reproduce", "evaluate", "export_faces", "train_fr"]
)
def test_help_is_grouped_marks_required_flags_shows_examples_and_no_empty_defaults(name):
    parser = runs.load_script(HELP_SCRIPTS[name]).build_parser()
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    assert text.count("(required)") == sum(action.required for action in parser._actions)
    assert "    python " in text or "accelerate launch" in text  # the docstring's examples
    titles = [group.title for group in parser._action_groups]
    assert any("output" in title for title in titles) and len(titles) >= 4, titles
    ungrouped = [a.dest for a in parser._optionals._group_actions if a.dest != "help"]
    assert ungrouped == [], f"flags outside the --help sections: {ungrouped}"


@pytest.mark.parametrize("name", sorted(HELP_SCRIPTS))
def test_abbreviated_flags_are_refused_not_guessed(name):
    """'--learn 1e-4' is not silently --learning_rate: every parser refuses abbreviations."""
    if name == "export_faces":
        parser = runs.load_script(HELP_SCRIPTS[name]).build_parser()
    else:
        parser = _parser(name)
    assert parser.allow_abbrev is False
    flag = max((a.option_strings[0] for a in parser._actions), key=len)
    abbreviation = flag[: max(len(flag) - 3, 4)]
    with pytest.raises(SystemExit):
        parser.parse_args([*_required(parser), abbreviation])


def test_readme_names_every_training_flag_that_differs_from_diffusers():
    readme = (REPO_ROOT / "README.md").read_text()
    flags = {a.option_strings[0] for a in _script("train").build_parser()._actions}
    for diffusers_flag in ("--validation_epochs", "--train_text_encoder", "--use_8bit_adam"):
        assert diffusers_flag not in flags and f"`{diffusers_flag}`" in readme
    assert "--validation_steps" in flags
