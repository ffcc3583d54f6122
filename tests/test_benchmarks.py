"""The benchmark scripts run end to end (correctness of their plumbing, not their timings)."""

import importlib.util
import sys

import pytest
from conftest import REPO_ROOT


def load_benchmark(name: str):
    path = REPO_ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_train_step_benchmark_times_both_recipes(tmp_path, capsys):
    bench = load_benchmark("bench_train_step")
    result = bench.main(
        bench.parse_args(["--size=tiny", "--steps=1", "--warmup=0", f"--workdir={tmp_path}"])
    )
    assert set(result["seconds_per_step"]) == {"reference", "ours"}
    assert all(seconds > 0 for seconds in result["seconds_per_step"].values())
    ratio = result["seconds_per_step"]["reference"] / result["seconds_per_step"]["ours"]
    assert abs(result["speedup_vs_reference"] - ratio) < 1e-2
    assert '"benchmark": "train_step"' in capsys.readouterr().out
