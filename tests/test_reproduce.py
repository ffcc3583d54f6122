"""reproduce_ID-Booth.py: the whole experiment in one command, killed anywhere and re-run.

Tiny random models and the demo's real faces; two variants to keep it short. The run is
killed (SIGKILL: no handler runs) once mid-training and once mid-generation; the third run
must finish the rest without touching what was finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REPO_ROOT, fake_base_model
from PIL import Image

import runs
from fileio import read_png_record

SCRIPT = REPO_ROOT / "reproduce_ID-Booth.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# The default facebook/dinov2-large is not in the (offline) test cache: tests that never reach
# the evaluation turn the feature metrics off.
NO_FEATURES = "--feature_model=none"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import demo

    root = tmp_path_factory.mktemp("reproduce")
    models = demo.prepare_embedded_models(root / "models")
    identities, class_dir, attributes = demo.prepare_embedded_identities(root / "data")
    return {
        "root": root,
        "models": models,
        "identities": identities,
        "class": class_dir,
        "attributes": attributes,
    }


def command(inputs: dict, output_dir: Path) -> list[str]:
    models = inputs["models"]
    return [
        sys.executable,
        str(SCRIPT),
        f"--pretrained_model_name_or_path={models['sd']}",
        f"--identities_root={inputs['identities']}",
        f"--class_data_dir={inputs['class']}",
        f"--identity_attributes={inputs['attributes']}",
        f"--arcface_weights={models['arcface']}",
        f"--output_dir={output_dir}",
        "--variants", "dreambooth", "triplet",
        "--resolution=64",
        "--num_images_per_identity=4",
        "--face_detector=dlib",
        "--embedder=dlib",
        f"--feature_model={models['dinov2']}",
        "--train_flags=--max_train_steps=8 --checkpointing_steps=2 --validation_steps=8 "
        "--num_class_images=4 --report_to=tensorboard",
        "--generate_flags=--num_inference_steps=3 --batch_size=1",
        "--evaluate_flags=--feature_image_size=56",
    ]  # fmt: skip


def run_until(argv: list[str], done: Callable[[], bool], timeout: float = 300) -> str:
    """Start the command, SIGKILL it as soon as `done()` holds; its output."""
    process = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while not done():
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, f"not reached in {timeout} s"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        output, _ = process.communicate()
    return output.decode(errors="replace")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def fingerprints(paths: list[Path]) -> dict[str, tuple[int, str]]:
    """path -> (mtime_ns, sha256): a rewrite changes it even with equal bytes."""
    return {
        str(path): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        for path in paths
    }


@pytest.mark.slow
def test_a_killed_experiment_resumes_without_redoing_finished_work(inputs, tmp_path):
    out = tmp_path / "experiment"
    argv = command(inputs, out)
    # 1. Killed mid-training: the dreambooth LoRAs are done, triplet/person_0 has a checkpoint.
    checkpoint = out / "loras" / "triplet" / "person_0" / "checkpoint-2"
    run_until(argv, lambda: checkpoint.is_dir())
    finished_loras = sorted((out / "loras" / "dreambooth").glob("*/pytorch_lora_weights*"))
    assert len(finished_loras) == 2
    after_training_kill = fingerprints(finished_loras)
    # 2. Killed mid-generation: some images on disk.
    images = lambda: sorted((out / "generated").glob("*/*/*.png"))  # noqa: E731
    second = run_until(argv, lambda: len(images()) >= 3)
    assert "resumed from" in second  # triplet/person_0 continued from its checkpoint
    finished_images = images()
    after_generation_kill = fingerprints(finished_images)
    # 3. The rerun finishes the rest.
    completed = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert fingerprints(finished_loras) == after_training_kill
    assert fingerprints(finished_images) == after_generation_kill
    assert len(images()) == 2 * 2 * 4
    for variant in ("dreambooth", "triplet"):
        for identity in ("person_0", "person_1"):
            lora = out / "loras" / variant / identity / "pytorch_lora_weights.safetensors"
            config = json.loads((lora.parent / "training_config.json").read_text())
            assert config["status"] == "finished" and config["global_step"] == 8
        rows = (out / "generated" / variant / "metadata.jsonl").read_text().splitlines()
        assert len(rows) == 8 and len({json.loads(r)["file"] for r in rows}) == 8
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert {"dreambooth", "triplet"} <= set(metrics["sets"])


def test_stage_command_lines_follow_the_arguments(tmp_path):
    reproduce = runs.load_script(SCRIPT)
    identities = tmp_path / "photos"
    identities.mkdir()
    args = reproduce.parse_args(
        [
            f"--pretrained_model_name_or_path={fake_base_model(tmp_path / 'sd')}",
            f"--identities_root={identities}",
            "--class_data_dir=class",
            "--arcface_weights=backbone.pth",
            f"--output_dir={tmp_path}",
            NO_FEATURES,
            "--variants", "triplet", "dreambooth", "triplet",
            "--train_flags=--pack 2 --max_train_steps '3'",
            "--embedder=dlib",
        ]
    )  # fmt: skip
    assert args.variants == ["triplet", "dreambooth"] and args.real == identities
    train = reproduce.train_argv(args, "dreambooth")
    assert "--loss=dreambooth" in train
    assert train[-4:] == ["--pack", "2", "--max_train_steps", "3"]  # last: they override
    assert f"--output_dir={tmp_path / 'loras' / 'dreambooth'}" in train
    assert "--resume_from_checkpoint=latest" in train
    generate = reproduce.generate_argv(args, "triplet")
    assert f"--lora_root={tmp_path / 'loras' / 'triplet'}" in generate
    assert "--identity_attributes" not in " ".join(generate)  # not given: not passed
    evaluate = reproduce.evaluate_argv(args)
    assert evaluate[:2] == [
        f"--generated=triplet={tmp_path / 'generated' / 'triplet'}",
        f"--generated=dreambooth={tmp_path / 'generated' / 'dreambooth'}",
    ]
    assert not any(flag.startswith("--arcface_weights") for flag in evaluate)  # dlib embedder
    assert not any(flag.startswith(("--quality", "--pose_weights")) for flag in evaluate)


def test_evaluation_runs_in_the_papers_quality_and_pose_settings(tmp_path):
    reproduce = runs.load_script(SCRIPT)
    identities = tmp_path / "photos"
    identities.mkdir()
    base = [
        f"--pretrained_model_name_or_path={fake_base_model(tmp_path / 'sd')}",
        f"--identities_root={identities}",
        "--class_data_dir=class",
        "--arcface_weights=backbone.pth",
        f"--output_dir={tmp_path}",
        NO_FEATURES,
        "--embedder=dlib",
        "--quality_weights=32572backbone.pth",
        "--pose_weights=6DRepNet_300W_LP_AFLW2000.pth",
    ]
    evaluate = reproduce.evaluate_argv(reproduce.parse_args(base))
    assert "--quality_setting=paper" in evaluate
    assert "--pose_weights=6DRepNet_300W_LP_AFLW2000.pth" in evaluate
    other = reproduce.evaluate_argv(reproduce.parse_args([*base, "--quality_setting=crfiqa-rgb"]))
    assert "--quality_setting=crfiqa-rgb" in other
    with pytest.raises(FileNotFoundError, match="--identities_root"):
        reproduce.parse_args(
            [
                f"--identities_root={tmp_path / 'missing'}",
                "--class_data_dir=class",
                "--arcface_weights=backbone.pth",
                f"--output_dir={tmp_path}",
            ]
        )


def test_a_rerun_with_other_settings_is_refused_before_any_stage(tmp_path, monkeypatch):
    """The experiment records its settings; a re-run with other training or generation flags
    is refused (the differences in one line) before any stage runs, so the report is never
    rebuilt from models of other settings. Paths compared by content and the evaluation's
    settings may change; --overwrite accepts new settings and passes --overwrite on."""
    reproduce = runs.load_script(SCRIPT)
    identities = tmp_path / "photos"
    identities.mkdir()
    stages = []
    monkeypatch.setattr(reproduce, "run_stage", lambda name, argv: stages.append((name, argv)))
    monkeypatch.setattr(reproduce, "train_variants", lambda args, state: stages.append("train"))
    monkeypatch.setattr(reproduce, "generate_variants", lambda args, state: None)
    base = [
        f"--pretrained_model_name_or_path={fake_base_model(tmp_path / 'sd')}",
        f"--identities_root={identities}",
        "--class_data_dir=class",
        "--arcface_weights=backbone.pth",
        f"--output_dir={tmp_path / 'experiment'}",
        NO_FEATURES,
        "--train_flags=--learning_rate 1e-3",
    ]
    reproduce.main(reproduce.parse_args(base))
    config = tmp_path / "experiment" / reproduce.EXPERIMENT_CONFIG_NAME
    assert json.loads(config.read_text())["args"]["train_flags"] == {"learning_rate": 1e-3}
    stages.clear()
    reproduce.main(reproduce.parse_args([*base, "--banner=rerun", "--embedder=dlib"]))
    assert stages[0] == "train"  # evaluation-only changes: the experiment goes on

    stages.clear()
    changed = [*base[:-1], "--train_flags=--learning_rate 1e-2", "--resolution=256"]
    with pytest.raises(ValueError) as error:
        reproduce.main(reproduce.parse_args(changed))
    message = str(error.value)
    assert "\n" not in message and "--overwrite" in message
    assert "train_flags --learning_rate: 0.001 -> 0.01" in message
    assert f"inference_ID-Booth.py --lora_root {tmp_path / 'experiment' / 'loras'}" in message
    assert "resolution: 512 -> 256" in message
    assert stages == []  # nothing trained, generated or evaluated
    overwrite = reproduce.parse_args([*changed, "--overwrite"])
    assert "--overwrite" in reproduce.train_argv(overwrite, "triplet")
    assert "--resume_from_checkpoint=latest" not in reproduce.train_argv(overwrite, "triplet")
    assert "--overwrite" in reproduce.generate_argv(overwrite, "triplet")
    reproduce.main(overwrite)
    assert json.loads(config.read_text())["args"]["resolution"] == 256


def _experiment(tmp_path: Path, monkeypatch) -> tuple[Any, list, list[str]]:
    """reproduce with stand-in stages (recorded in the list) and a base command line."""
    reproduce = runs.load_script(SCRIPT)
    (tmp_path / "photos").mkdir(exist_ok=True)
    stages = []
    monkeypatch.setattr(reproduce, "train_variants", lambda args, state: stages.append("train"))
    monkeypatch.setattr(reproduce, "generate_variants", lambda args, state: None)
    monkeypatch.setattr(reproduce, "run_stage", lambda name, argv: stages.append(name))
    base = [
        f"--pretrained_model_name_or_path={fake_base_model(tmp_path / 'sd')}",
        f"--identities_root={tmp_path / 'photos'}",
        "--class_data_dir=class",
        "--arcface_weights=backbone.pth",
        f"--output_dir={tmp_path / 'experiment'}",
        "--embedder=dlib",
        NO_FEATURES,
        NO_GENDER_PROMPTS.replace("--generate_flags=", "--generate_flags=--scheduler ddim "),
    ]
    return reproduce, stages, base


def test_an_identity_no_longer_in_the_identities_root_is_refused_before_any_stage(
    tmp_path, monkeypatch
):
    """The report evaluates whole variant folders: LoRAs or images of an identity whose photos
    left --identities_root would enter it silently, so the run is refused, naming them."""
    reproduce, stages, base = _experiment(tmp_path, monkeypatch)
    (tmp_path / "photos" / "ID_a").mkdir()
    args = reproduce.parse_args(base)
    (reproduce.images_of(args, args.variants[0]) / "ID_gone").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds 1 identity that .* no longer has \(ID_gone\)"):
        reproduce.main(args)
    assert stages == []
    (reproduce.images_of(args, args.variants[0]) / "ID_gone").rmdir()
    (reproduce.loras_of(args, args.variants[0]) / "ID_a").mkdir(parents=True)  # a current one
    reproduce.main(args)
    assert stages[0] == "train"


def test_pass_through_flags_compare_as_the_settings_they_parse_to(tmp_path, monkeypatch):
    """'--x=4' and '--x 4', another order, or a default spelt out are the same settings; a
    config that stored the flags' text (older versions) is parsed and compared alike."""
    reproduce, stages, base = _experiment(tmp_path, monkeypatch)
    reproduce.main(reproduce.parse_args([*base, "--train_flags=--learning_rate=1e-3 --pack 2"]))
    same = "--train_flags=--pack=2 --learning_rate 0.001 --rank 4"  # rank 4 is the default
    reproduce.main(reproduce.parse_args([*base, same]))
    config = tmp_path / "experiment" / reproduce.EXPERIMENT_CONFIG_NAME
    saved = json.loads(config.read_text())
    saved["args"]["train_flags"] = ["--learning_rate", "1e-3", "--pack", "2"]  # old: text
    config.write_text(json.dumps(saved))
    reproduce.main(reproduce.parse_args([*base, same]))
    config.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="train_flags --learning_rate: 0.001 -> 0.01"):
        reproduce.main(reproduce.parse_args([*base, "--train_flags=--learning_rate=1e-2"]))


def test_a_failed_run_records_no_settings_so_its_corrected_rerun_goes_on(tmp_path, monkeypatch):
    """experiment_config.json is written once training has finished: a run whose first
    stage fails does not make the corrected re-run look like 'other settings'."""
    reproduce, stages, base = _experiment(tmp_path, monkeypatch)

    def fail(args, state):
        raise reproduce.StageError("training dreambooth: 1 failed (dreambooth/ID_a)")

    monkeypatch.setattr(reproduce, "train_variants", fail)
    with pytest.raises(reproduce.StageError):
        reproduce.main(reproduce.parse_args([*base, "--train_flags=--learning_rate=1e-1"]))
    config = tmp_path / "experiment" / reproduce.EXPERIMENT_CONFIG_NAME
    assert not config.exists()
    monkeypatch.setattr(reproduce, "train_variants", lambda args, state: stages.append("train"))
    reproduce.main(reproduce.parse_args([*base, "--train_flags=--learning_rate=1e-3"]))
    assert stages[0] == "train" and config.is_file()


def test_evaluation_and_fr_utility_flags_may_change_on_a_rerun(tmp_path, monkeypatch):
    reproduce, stages, base = _experiment(tmp_path, monkeypatch)
    reproduce.main(reproduce.parse_args(base))
    stages.clear()
    later = ["--fr_flags=--num_epochs 2", "--fr_settings", "real", "--pose_weights=pose.pth"]
    later += ["--quality_weights=q.pth", "--quality_setting=crfiqa-rgb"]
    reproduce.main(reproduce.parse_args([*base, *later]))
    assert stages[0] == "train"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--generate_flags=--output_dir x", "--generate_flags: --output_dir is set by this "
         "command; use --output_dir instead"),
        ("--generate_flags=--lora_dir=x", "use --output_dir (the LoRAs are"),
        ("--generate_flags=--pretrained_model_name_or_path x",
         "use --pretrained_model_name_or_path instead"),
        ("--train_flags=--loss identity", "--train_flags: --loss is set by this command; use "
         "--variants instead"),
        ("--train_flags=--resume_from_checkpoint=latest", "use --overwrite (without it"),
        ("--evaluate_flags=--out o", "--evaluate_flags: --out is set by this command"),
        ("--fr_flags=--data_dir d", "--fr_flags: --data_dir is set by this command"),
    ],
)  # fmt: skip
def test_pass_through_flags_refuse_what_this_command_sets(tmp_path, flags, message):
    reproduce = runs.load_script(SCRIPT)
    extra = [NO_GENDER_PROMPTS, flags]
    if flags.startswith("--generate_flags="):  # one --generate_flags value holds them all
        extra = [f"{NO_GENDER_PROMPTS} {flags.removeprefix('--generate_flags=')}"]
    with pytest.raises(ValueError, match=re.escape(message)):
        reproduce.parse_args(early_argv(tmp_path, *extra))


def test_every_managed_flag_is_a_flag_of_its_stage():
    reproduce = runs.load_script(SCRIPT)
    for stage in reproduce.STAGE_SCRIPTS:
        dests = {action.dest for action in reproduce.stage_parser(stage)._actions}
        assert set(reproduce.MANAGED_FLAGS[stage]) <= dests, stage


def test_errors_of_what_this_command_passes_name_its_own_flag(tmp_path):
    """A value of this command that a stage refuses is not blamed on --generate_flags ''."""
    reproduce = runs.load_script(SCRIPT)
    argv = early_argv(tmp_path, NO_GENDER_PROMPTS, "--num_images_per_identity=2000000")
    with pytest.raises(ValueError) as error:
        reproduce.parse_args(argv)
    assert "--generate_flags" not in str(error.value)
    assert str(error.value).startswith("--num_images_per_identity must be")


NO_GENDER_PROMPTS = (
    "--generate_flags=--prompt_template 'photo of sks person, {background} background' "
    "--prompt_template_no_background 'photo of sks person'"
)


def early_argv(tmp_path: Path, *extra: str) -> list[str]:
    """A reproduce command line over two identity folders and a stand-in base model."""
    for name in ("ID_a", "ID_b"):
        (tmp_path / "photos" / name).mkdir(parents=True, exist_ok=True)
    base = fake_base_model(tmp_path / "sd")
    return [
        f"--pretrained_model_name_or_path={base}",
        f"--identities_root={tmp_path / 'photos'}",
        f"--class_data_dir={tmp_path / 'class'}",
        f"--arcface_weights={tmp_path / 'backbone.pth'}",
        f"--output_dir={tmp_path / 'experiment'}",
        NO_FEATURES,
        *extra,
    ]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("ID_a,male\nID_b,female\n", "has no header"),
        ("Identity,Gender\nID_a,male\nID_b,female\n", "column names are lower case"),
        ("identity;gender\nID_a;male\nID_b;female\n", "separates fields with ';'"),
        ("identity,gender\nID_a,male\n", "no gender for 1 identity: ID_b"),
        ("identity,gender\nID_a,male\nID_b,tall\n", "unknown gender values ID_b='tall'"),
    ],
)
def test_a_bad_attributes_file_fails_before_any_stage(tmp_path, rows, message):
    reproduce = runs.load_script(SCRIPT)
    attributes = tmp_path / "genders.csv"
    attributes.write_text(rows)
    with pytest.raises(ValueError, match=message):
        reproduce.parse_args(early_argv(tmp_path, f"--identity_attributes={attributes}"))


def test_no_attributes_file_fails_before_any_stage_unless_the_prompt_needs_no_gender(tmp_path):
    reproduce = runs.load_script(SCRIPT)
    with pytest.raises(ValueError, match="no gender for 2 identities: ID_a, ID_b"):
        reproduce.parse_args(early_argv(tmp_path))
    reproduce.parse_args(early_argv(tmp_path, NO_GENDER_PROMPTS))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--evaluate_flags", "--no-poses"], "--evaluate_flags '--no-poses': unrecognized"),
        (["--train_flags=--max_train_stepz 3"], "--train_flags '--max_train_stepz 3'"),
        (["--generate_flags=--batch_size 0"], "--batch_size must be >= 1, got 0"),
        (["--generate_flags=--mixed_precision fp32"], "invalid choice: 'fp32'"),
        (["--generate_flags=--scheduler ddpmx"], "unknown --scheduler 'ddpmx'"),
        (
            ["--generate_flags=--prompt_template 'photo of {gendr}'"],
            "has unknown placeholder(s) {gendr}",
        ),
    ],
)
def test_misspelt_pass_through_flags_fail_before_any_stage(tmp_path, flags, message):
    reproduce = runs.load_script(SCRIPT)
    genders = tmp_path / "genders.csv"
    genders.write_text("identity,gender\nID_a,male\nID_b,female\n")
    argv = early_argv(tmp_path, f"--identity_attributes={genders}", *flags)
    with pytest.raises(ValueError, match=re.escape(message)):
        reproduce.parse_args(argv)


def test_unquoted_or_repeated_stage_flags_are_named(tmp_path):
    """'--train_flags --max_train_steps 6' leaves '6' over: the message says to quote the
    stage's flags; a --STAGE_flags given twice is refused (argparse keeps the last silently)."""
    reproduce = runs.load_script(SCRIPT)
    argv = early_argv(tmp_path, NO_GENDER_PROMPTS, "--train_flags", "--max_train_steps", "6")
    with pytest.raises(ValueError, match=r"unrecognized arguments: 6; a stage's flags go in one"):
        reproduce.parse_args(argv)
    twice = early_argv(tmp_path, NO_GENDER_PROMPTS, "--train_flags=--rank 4", "--train_flags=")
    with pytest.raises(ValueError, match="--train_flags is given twice"):
        reproduce.parse_args(twice)


def test_a_single_pass_through_flag_needs_no_equals_sign(tmp_path):
    reproduce = runs.load_script(SCRIPT)
    argv = early_argv(tmp_path, "--evaluate_flags", "--no-pose", "--embedder=dlib")
    argv.append(NO_GENDER_PROMPTS)
    assert reproduce.parse_args(argv).evaluate_flags == ["--no-pose"]


def test_the_command_refuses_a_misspelt_flag_in_one_line_before_writing_anything(tmp_path):
    argv = early_argv(tmp_path, "--evaluate_flags=--no-poses")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("reproduce_ID-Booth.py: error: ")
    assert not (tmp_path / "experiment").exists()


def test_stage_errors_name_flags_as_this_command_spells_them():
    reproduce = runs.load_script(SCRIPT)
    generation = runs.load_script(REPO_ROOT / "inference_ID-Booth.py")
    message = "out holds images made with other settings; use a new --output_dir, or --overwrite"
    translated = reproduce.in_reproduce_terms(message, "generate", generation.build_parser())
    assert translated == message  # reproduce has both flags itself (--overwrite: every stage)
    message = "batch of 64 does not fit: lower --batch_size or --resolution"
    translated = reproduce.in_reproduce_terms(message, "generate", generation.build_parser())
    assert translated.endswith("lower --generate_flags=--batch_size or --resolution")


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_keeps_finished_work(inputs, tmp_path):
    from test_interrupts import interrupt_when

    out = tmp_path / "experiment"
    stopped = interrupt_when(command(inputs, out), "loras/triplet/person_0", cwd=tmp_path)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stdout, stopped.stdout[-3000:]
    last = stopped.stdout.strip().splitlines()[-1]
    assert last.startswith("reproduce_ID-Booth.py: interrupted"), last
    assert len(list((out / "loras" / "dreambooth").glob("*/pytorch_lora_weights*"))) == 2


@pytest.mark.slow
def test_two_processes_make_the_same_experiment_as_one(inputs, tmp_path):
    """torchrun with 2 processes: identities, class images and image batches are split, the
    evaluation runs on rank 0; every LoRA (bytes), image and class image (pixels and record)
    equals a one-process run's."""
    outputs = {}
    for processes in (2, 1):
        out = tmp_path / f"p{processes}"
        argv = command(inputs, out)[1:]  # without the interpreter
        argv[argv.index(f"--class_data_dir={inputs['class']}")] = f"--class_data_dir={out}/class"
        # identity, not triplet: every class image is sampled here (faceless), and a triplet
        # run with no class face is refused (it would never apply its identity term)
        argv[argv.index("--variants") + 1 : argv.index("--variants") + 3] = ["identity"]
        argv = [a.replace("--num_class_images=4", "--num_class_images=6") for a in argv]
        torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone"]
        launcher = (
            [*torchrun, f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
        )
        completed = subprocess.run(
            [*launcher, *argv], env=ENV, capture_output=True, text=True, timeout=600
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        loras = out.glob("loras/*/*/pytorch_lora_weights.safetensors")
        outputs[processes] = {str(f.relative_to(out)): f.read_bytes() for f in loras}
        class_images = out.glob("class/class_*")
        outputs[processes] |= {str(f.relative_to(out)): pixels(f) for f in class_images}
        for image in out.glob("generated/*/*/*.png"):
            record = read_png_record(image)  # its LoRA path names this run's folder
            record["lora_path"] = str(Path(record["lora_path"]).relative_to(out))
            outputs[processes][str(image.relative_to(out))] = (pixels(image), record)
    assert len(outputs[1]) == 2 + 2 * 4 + 6  # LoRAs, images, class images (all sampled here)
    assert outputs[2].keys() == outputs[1].keys()
    for name, one in outputs[1].items():
        two = outputs[2][name]
        if isinstance(one, bytes):
            assert two == one, name
        elif isinstance(one, tuple):
            assert np.array_equal(two[0], one[0]) and two[1] == one[1], name
        else:
            assert np.array_equal(two, one), name


def test_fr_utility_stage_trains_the_paper_settings_and_feeds_the_report(tmp_path, monkeypatch):
    reproduce = runs.load_script(SCRIPT)
    identities = tmp_path / "photos"
    identities.mkdir()
    base = [
        f"--pretrained_model_name_or_path={fake_base_model(tmp_path / 'sd')}",
        f"--identities_root={identities}",
        "--class_data_dir=class",
        "--arcface_weights=backbone.pth",
        f"--output_dir={tmp_path}",
        NO_FEATURES,
        "--embedder=dlib",
        "--face_detector=dlib",
        "--variants", "dreambooth", "triplet",
    ]  # fmt: skip
    args = reproduce.parse_args(base)
    assert not any(flag.startswith("--fr_utility") for flag in reproduce.evaluate_argv(args))
    reproduce.fr_utility_stage(args, runs.process_state())  # not asked for: nothing runs
    assert not (tmp_path / "fr_utility").exists()

    with pytest.raises(FileNotFoundError, match="--fr_benchmarks .* is not a folder"):
        reproduce.parse_args([*base, f"--fr_benchmarks={tmp_path / 'bins'}"])
    (tmp_path / "bins").mkdir()
    (tmp_path / "bins" / "cplfw.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"--fr_selection_benchmarks \['lfw'\]"):
        bins = f"--fr_benchmarks={tmp_path / 'bins'}"
        reproduce.parse_args([*base, bins, "--fr_selection_benchmarks", "lfw"])
    with pytest.raises(ValueError, match="--fr_flags '--nope': unrecognized arguments"):
        # train_fr.py's own parser, before any stage runs, in one line
        reproduce.parse_args([*base, f"--fr_benchmarks={tmp_path / 'bins'}", "--fr_flags=--nope"])
    args = reproduce.parse_args(
        [*base, f"--fr_benchmarks={tmp_path / 'bins'}", "--fr_flags=--backbone r18"]
    )
    fr_utility = runs.load_script(REPO_ROOT / "Evaluation" / "fr_utility.py")
    calls = []
    monkeypatch.setattr(fr_utility, "run_fr_utility", lambda *a, **k: calls.append((a, k)))
    reproduce.fr_utility_stage(args, runs.process_state())
    (settings, benchmarks, out_root, flags, selection), keywords = calls[0]
    assert [s.label for s in settings] == [
        "real",
        "synthetic (dreambooth)",
        "synthetic (triplet)",
        "real + synthetic (dreambooth)",
        "real + synthetic (triplet)",
    ]
    assert settings[-1].data_dirs == [identities, tmp_path / "generated" / "triplet"]
    assert benchmarks == tmp_path / "bins" and selection is None  # lfw when present
    assert out_root == tmp_path / "fr_utility" and keywords == {"is_main_process": True}
    # the official protocol by default; the user's flags come last and override
    assert flags[: len(fr_utility.OFFICIAL_PROTOCOL_FLAGS)] == list(
        fr_utility.OFFICIAL_PROTOCOL_FLAGS
    )
    assert "--early_stopping_epochs=6" in flags and "--plateau_patience=4" in flags
    assert flags[-3:] == ["--face_detector=dlib", "--backbone", "r18"]
    evaluate = reproduce.evaluate_argv(args)
    assert f"--fr_utility={tmp_path / 'fr_utility' / 'fr_utility.json'}" in evaluate


@pytest.mark.slow
def test_the_experiment_runs_end_to_end_on_an_sdxl_base(inputs, tmp_path):
    """reproduce_ID-Booth.py with a tiny random SDXL base (fp16 on the CPU: its VAE in fp32):
    class images, triplet LoRAs, generation at the base's native size, the report."""
    from random_models import build_tiny_sd

    reproduce = runs.load_script(SCRIPT)
    sdxl = build_tiny_sd(tmp_path / "tiny-sdxl", size="tiny-sdxl")
    argv = command(inputs, tmp_path / "experiment")[2:]
    argv = [a for a in argv if not a.startswith(("--pretrained", "--resolution", "--train_flags"))]
    argv = [a for a in argv if a not in ("dreambooth",)]  # --variants triplet
    argv += [
        f"--pretrained_model_name_or_path={sdxl}",
        "--train_flags=--max_train_steps=2 --num_class_images=2 --class_num_inference_steps=2 "
        "--validation_prompt= --report_to=none",
    ]
    result = reproduce.main(reproduce.parse_args(argv))
    out = tmp_path / "experiment"
    for identity in ("person_0", "person_1"):
        config = json.loads(
            (out / "loras" / "triplet" / identity / "training_config.json").read_text()
        )
        assert config["resolved"]["architecture"]["family"] == "sdxl"
        assert config["resolved"]["vae_dtype"] == "float32" and config["args"]["resolution"] == 64
    rows = (out / "generated" / "triplet" / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == 2 * 4 and {json.loads(r)["resolution"] for r in rows} == {64}
    assert "triplet" in result["metrics"]["sets"]


def fake_hub_snapshot(cache: Path, repo_id: str, filename: str) -> None:
    """A Hugging Face cache holding `filename` of `repo_id` (what a download leaves)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / filename).write_text("{}")


def test_an_unusable_feature_model_fails_before_any_stage(tmp_path, monkeypatch):
    """The evaluation loads DINOv2 last, after training and generation: offline and not cached
    (or a wrong folder), the command refuses at once, naming the flag to fix or turn it off."""
    from huggingface_hub import constants

    reproduce = runs.load_script(SCRIPT)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    argv = [*early_argv(tmp_path, NO_GENDER_PROMPTS), "--embedder=dlib"]
    default = [flag for flag in argv if flag != NO_FEATURES]  # facebook/dinov2-large
    with pytest.raises(FileNotFoundError) as error:
        reproduce.parse_args(default)
    message = str(error.value)
    assert "feature model 'facebook/dinov2-large'" in message and "HF_HUB_OFFLINE=1" in message
    assert "--feature_model DIR" in message and "--feature_model none" in message
    assert "\n" not in message
    with pytest.raises(FileNotFoundError, match="has no config.json.*--feature_model none"):
        reproduce.parse_args([*default, f"--feature_model={tmp_path / 'photos'}"])
    with pytest.raises(FileNotFoundError, match="is not a folder.*--feature_model none"):
        reproduce.parse_args([*default, f"--feature_model={tmp_path / 'no-dinov2'}"])
    fake_hub_snapshot(tmp_path / "hub", "facebook/dinov2-large", "config.json")
    assert reproduce.parse_args(default).feature_model == "facebook/dinov2-large"  # cached
    args = reproduce.parse_args(argv)  # none: the evaluation skips the feature metrics
    evaluate = runs.load_script(REPO_ROOT / "Evaluation" / "evaluate.py")
    (tmp_path / "experiment" / "generated" / "dreambooth").mkdir(parents=True)
    (tmp_path / "experiment" / "generated" / "identity").mkdir(parents=True)
    (tmp_path / "experiment" / "generated" / "triplet").mkdir(parents=True)
    assert evaluate.parse_args(reproduce.evaluate_argv(args)).feature_model is None


def test_identity_photos_one_level_too_deep_fail_before_any_stage(tmp_path):
    reproduce = runs.load_script(SCRIPT)
    argv = early_argv(tmp_path, NO_GENDER_PROMPTS)
    (tmp_path / "photos" / "ID_a" / "session_1").mkdir()
    (tmp_path / "photos" / "ID_b" / "01.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"1 identity folders hold no photos \(ID_a\)"):
        reproduce.parse_args(argv)
    flags = "--train_flags=--instance_data_dir " + str(tmp_path / "photos")
    with pytest.raises(ValueError, match="--instance_data_dir is set by this command"):
        reproduce.parse_args([*early_argv(tmp_path / "other", NO_GENDER_PROMPTS), flags])
