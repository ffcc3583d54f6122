#!/usr/bin/env bash
# One prepared GPU session (about 10 minutes on an H200): the SD 2.1-shaped benchmarks and the
# CUDA-only paths no CPU test reaches (pinned copies, sync-debug mode, CUDA graphs, fp16 on
# the GPU). Random weights: only time, memory and "it runs" mean anything.
#
# Machines without diffusers: put its wheel (pure Python) and any other missing one in .whl/
# first (`pip download --no-deps -d .whl diffusers==0.42.1`) and carry .whl.
# Results land in ${OUT:-gpu_results}/ as JSON; paste them into benchmarks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

# Sampler on CUDA: stock-pipeline equality, sync-free steps, CUDA-graph replay.
python3 - <<'EOF' | tee "$out/sampler_cuda.json"
import json, torch
from random_models import build_random_sd_pipeline
from sampling import Sampler, encode_prompts, seeded_generators
pipe = build_random_sd_pipeline("sd21").to("cuda", torch.float16)
pipe.set_progress_bar_config(disable=True)
prompts, negatives, seeds = ["a face"] * 4, ["cartoon"] * 4, [0, 1, 2, 3]
size = dict(height=512, width=512, num_inference_steps=10, guidance_scale=5)
stock = pipe(prompts, negative_prompt=negatives, generator=seeded_generators(seeds),
             output_type="latent", **size).images
embeds, negative = encode_prompts(pipe, prompts, negatives)
result = {}
for name, options in {"eager": {}, "cuda_graph": {"cuda_graph": True}}.items():
    sampler = Sampler.from_pipeline(pipe, **size, **options)
    sampler.sample(embeds, negative, seeds)  # warm-up / capture
    torch.cuda.set_sync_debug_mode("error")
    try:
        latents = sampler.sample(embeds, negative, seeds)
        result[name] = {"sync_free": True}
    except RuntimeError as error:
        torch.cuda.set_sync_debug_mode("default")
        latents = sampler.sample(embeds, negative, seeds)
        result[name] = {"sync_free": str(error).splitlines()[0]}
    torch.cuda.set_sync_debug_mode("default")
    result[name]["max_abs_vs_stock"] = (latents - stock).abs().max().item()
print(json.dumps(result, indent=2))
EOF

python3 benchmarks/bench_generate.py --size sd21 --identities 4 --images_per_identity 8 \
  --batch_sizes 1 16 32 | tee "$out/bench_generate.json"
python3 benchmarks/bench_train_step.py --size sd21 --packs 1 2 4 8 --steps 10 --warmup 3 \
  --rounds 1 | tee "$out/bench_train_step.json"
