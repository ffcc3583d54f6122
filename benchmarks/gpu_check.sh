#!/usr/bin/env bash
# One prepared GPU session: the SD 2.1-shaped benchmarks and the CUDA-only paths no CPU test
# reaches (the sampler under the sync-debug mode, CUDA-graph replay, fp16 on the GPU); prints
# benchmarks/README.md's tables as markdown (also in ${OUT:-gpu_results}/tables.md). Random
# weights: only time, memory and "it runs" mean anything. Not yet run on a GPU.
#
#   benchmarks/prepare_gpu_wheels.sh     # first, on a machine with internet: .whl/
#   benchmarks/gpu_check.sh              # on the GPU machine (carry .whl)
#   benchmarks/gpu_check.sh --dry-run    # the same steps on the CPU with tiny models (CI)
#
# The SD 2.1-shaped random models are built once, in $GPU_CHECK_WORKDIR (default: a temp
# folder), and every step loads them from there. GPU_CHECK_SIZE picks another base's shapes
# (sd15, sd21-v, sdxl; tiny-sdxl etc. for --dry-run): random_models.RANDOM_MODEL_NAMES.
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=false
[[ "${1:-}" == "--dry-run" ]] && dry_run=true
out=${OUT:-gpu_results}
work=${GPU_CHECK_WORKDIR:-$(mktemp -d)}
mkdir -p "$out" "$work"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if $dry_run; then
  size=${GPU_CHECK_SIZE:-tiny} device=cpu train_precision=no generate_precision=no
  generate=(--identities 2 --images_per_identity 2 --batch_sizes 1 2 --reference_batch_sizes 1 2)
  train=(--packs 1 2 --steps 1 --warmup 1 --rounds 1)
else
  size=${GPU_CHECK_SIZE:-sd21} device=cuda train_precision=bf16 generate_precision=fp16
  generate=(--identities 4 --images_per_identity 8 --batch_sizes 1 16 --reference_batch_sizes 1 16)
  train=(--packs 1 2 4 8 --steps 10 --warmup 3 --rounds 1)
fi
phase() { echo "[gpu_check ${SECONDS}s] $*" >&2; }

phase "wheels"
if compgen -G ".whl/*.whl" >/dev/null; then
  if $dry_run; then  # resolve for the GPU's Python 3.12 without installing anything here
    python3 -m pip install --dry-run --quiet --no-index --no-deps --only-binary=:all: \
      --python-version 3.12 --platform manylinux_2_28_x86_64 --target "$work/site" \
      --find-links .whl .whl/*.whl
  else
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site --find-links .whl .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  fi
else
  phase "no .whl/ folder: using the installed packages (run benchmarks/prepare_gpu_wheels.sh)"
fi
python3 -c "import diffusers, torch; print('diffusers', diffusers.__version__, 'torch', torch.__version__)"
if ! $dry_run; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
fi

phase "models ($size), built once"
python3 - "$work" "$size" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from bench_train_step import build_models
print(*build_models(Path(sys.argv[1]), sys.argv[2]))
EOF

phase "sampler on $device: equal to the stock pipeline, host syncs, CUDA-graph replay"
python3 - "$work/sd-$size" "$device" "$generate_precision" <<'EOF' | tee "$out/sampler.md"
import sys, torch
from diffusers import DDPMScheduler
from sampling import Sampler, load_pipeline, prompt_conditioning, seeded_generators
folder, device, precision = sys.argv[1:]
dtype = {"no": torch.float32, "fp16": torch.float16}[precision]
pipe = load_pipeline(folder, device, dtype)  # StableDiffusion(XL)Pipeline, by its configs
pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
prompts, negatives, seeds = ["a face"] * 4, ["cartoon"] * 4, [0, 1, 2, 3]
size = dict(height=resolution, width=resolution, num_inference_steps=10, guidance_scale=5)
stock = pipe(prompts, negative_prompt=negatives, generator=seeded_generators(seeds),
             output_type="latent", **size).images
conditioning = prompt_conditioning(pipe, prompts, negatives)
variants = {"eager": {}, "cuda_graph": {"cuda_graph": True}} if device == "cuda" else {"eager": {}}
print("| sampler | device | precision | host syncs in a sampling call | max abs diff vs stock |")
print("|---|---|---|---|---|")
for name, options in variants.items():
    sampler = Sampler.from_pipeline(pipe, **size, **options)
    sampler.sample(seeds=seeds, **conditioning)  # warm-up / capture
    syncs = "not measured (no CUDA)"
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            latents = sampler.sample(seeds=seeds, **conditioning)
            syncs = "none"
        except RuntimeError as error:
            syncs = str(error).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    latents = sampler.sample(seeds=seeds, **conditioning)
    worst = (latents.float() - stock.float()).abs().max().item()
    print(f"| {name} | {device} | {precision} | {syncs} | {worst:.3g} |")
EOF

phase "generation benchmark"
python3 benchmarks/bench_generate.py --size "$size" --device "$device" \
  --mixed_precision "$generate_precision" --workdir "$work" "${generate[@]}" \
  --format markdown | tee "$out/bench_generate.md"

phase "training benchmark (timings, then counts on fake tensors)"
python3 benchmarks/bench_train_step.py --size "$size" --device "$device" \
  --mixed_precision "$train_precision" --workdir "$work" "${train[@]}" \
  --format markdown | tee "$out/bench_train_step.md"

cat "$out/sampler.md" "$out/bench_generate.md" "$out/bench_train_step.md" >"$out/tables.md"
phase "done: $out/tables.md"
