#!/usr/bin/env bash
# Run on a machine with internet (the CPU development machine), before a GPU session: download
# into .whl/ (git-ignored) the wheels of the packages this project imports that the GPU
# machines lack, for their Python 3.12 on manylinux x86_64, at the versions installed here
# (the versions the tests ran with). benchmarks/gpu_check.sh installs them offline; the GPU
# session carries the folder (the device tool's `carry: [".whl"]`, at most 64 MiB in all).
#
# The GPU image has torch, accelerate, peft, transformers, numpy, pillow, safetensors,
# huggingface-hub, opencv-python-headless, onnx, onnxruntime, scipy, scikit-image, tqdm and
# tensorboard (/work/.library/device/KINDS.md, read 2026-11-17). The project's other imports:
#   diffusers (+ importlib_metadata, lazy-importer it needs), dlib (dlib-bin), onnx2torch,
#   insightface. face-recognition-models (dlib's landmark models) is a 100 MB sdist, past the
#   carry limit: gpu_check.sh does not need it (its benchmark stands a template in for the
#   detector). Each wheel's own requirements are checked against that list at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
packages=(diffusers importlib_metadata lazy-importer dlib-bin onnx2torch insightface)
on_gpu_image="torch accelerate peft transformers numpy pillow safetensors huggingface-hub
  opencv-python-headless onnx onnxruntime scipy scikit-image scikit-learn tqdm tensorboard
  filelock regex requests zipp torchvision typing-extensions packaging pyyaml"

pins=()
for name in "${packages[@]}"; do
  version=$(python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  pins+=("$name==$version")
done
mkdir -p "$dest"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$dest" "${pins[@]}"

# Every requirement of the downloaded wheels is on the GPU image or among the wheels.
python3 - "$dest" "$on_gpu_image ${packages[*]}" <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

folder, known = Path(sys.argv[1]), {canonicalize_name(n) for n in sys.argv[2].split()}
known.add("opencv-python")  # insightface's; the image's opencv-python-headless is the same cv2
missing = []
for wheel in sorted(folder.glob("*.whl")):
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(name).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.split(":", 1)[1].strip())
        environment = {"python_version": "3.12", "extra": ""}
        if requirement.marker and not requirement.marker.evaluate(environment):
            continue
        if canonicalize_name(requirement.name) not in known:
            missing.append(f"{wheel.name}: {requirement}")
total = sum(path.stat().st_size for path in folder.glob("*.whl")) / 2**20
print(f"{len(list(folder.glob('*.whl')))} wheels in {folder}, {total:.1f} MiB")
if missing:
    sys.exit("requirements neither on the GPU image nor downloaded:\n" + "\n".join(missing))
if total > 60:
    sys.exit(f"{total:.0f} MiB of wheels: the GPU session carries at most 64 MiB in all")
EOF
