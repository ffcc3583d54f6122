"""multi_lora.py against peft, diffusers and torch on a tiny random SD-2.1-shaped UNet.

Every per-identity quantity of the batched LoRA is compared with the ordinary one-identity
path: peft's gaussian init for a seed, the diffusers LoRA file read by `load_lora_weights`,
peft's forward (fp32 and under autocast), solo gradients, torch's clip_grad_norm_ and
torch.optim.AdamW(foreach=False).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from host_syncs import HostTransferError, NoHostTransfers

import multi_lora as ml
from random_models import TINY_TEXT_HIDDEN, build_random_sd_pipeline, write_random_lora

TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
RANK, ALPHA, K = 4, 4, 3
TOKENS = 7
ADAMW = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
LRS = [1e-3, 3e-2, 2e-1]  # per identity


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    return build_random_sd_pipeline("tiny", seed=0)


def _peft_unet(base_unet: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy of the UNet with one peft adapter, created the way training does."""
    from peft import LoraConfig

    unet = copy.deepcopy(base_unet).requires_grad_(False)
    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=TARGETS
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config)
    return unet


def _peft_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def _set_peft_state(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), "default")
    assert not getattr(result, "unexpected_keys", [])


def _batched(base_unet: torch.nn.Module, num_identities: int = K):
    unet = copy.deepcopy(base_unet)
    return unet, ml.inject_batched_lora(unet, TARGETS, num_identities, RANK, ALPHA)


def _randomize(handle: ml.BatchedLoRA, seed: int) -> None:
    """Non-zero A and B for every identity (a fresh init has B = 0, which hides mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in handle.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def _inputs(batch: int, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, 8, 8, generator=generator),
        timestep=torch.randint(0, 1000, (batch,), generator=generator),
        encoder_hidden_states=torch.randn(batch, TOKENS, TINY_TEXT_HIDDEN, generator=generator),
    )


def _rows(inputs: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    return {name: value[rows] for name, value in inputs.items()}


def _lora_metadata(handle: ml.BatchedLoRA) -> dict:
    config = ml.lora_config(handle).to_dict()
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}


# ---------------------------------------------------------------------------- init and layout


def test_init_identity_equals_peft_gaussian_init_bit_for_bit(pipe):
    unet, handle = _batched(pipe.unet)
    seeds = [11, 12, 13]
    rng_before = torch.random.get_rng_state()
    for k, seed in enumerate(seeds):
        ml.init_identity_(handle, k, seed)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG untouched
    for k, seed in enumerate(seeds):
        reference = _peft_unet(pipe.unet, seed)
        expected, actual = _peft_state(reference), ml.identity_state_dict(handle, k)
        assert list(actual) == list(expected)
        for key in expected:
            assert torch.equal(actual[key], expected[key]), key
        assert ml.lora_config(handle).to_dict() == reference.peft_config["default"].to_dict()
    assert not torch.equal(handle.parameters()[0][0], handle.parameters()[0][1])
    trainable = [name for name, p in unet.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(handle.layers)
    assert all(name.endswith((".lora_A", ".lora_B")) for name in trainable)


def test_inject_keeps_names_and_remove_restores_the_unet(pipe):
    unet, handle = _batched(pipe.unet)
    suffixes = tuple("." + target for target in TARGETS)
    linear_names = [n for n, _ in pipe.unet.named_modules() if n.endswith(suffixes)]
    assert list(handle.layers) == linear_names
    _randomize(handle, 0)
    handle.remove()
    assert all(type(unet.get_submodule(n)) is torch.nn.Linear for n in linear_names)
    inputs = _inputs(2)
    frozen = copy.deepcopy(pipe.unet).requires_grad_(False)  # frozen weights take other kernels
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, frozen(**inputs).sample)
    with pytest.raises(ValueError, match="no module"):
        ml.inject_batched_lora(copy.deepcopy(pipe.unet), ["nothing_here"], 2, RANK, ALPHA)


def test_layer_handles_token_and_flat_inputs_and_checks_the_batch():
    selection = ml.IdentitySelection()
    layer = ml.BatchedLoRALinear(torch.nn.Linear(6, 5), 3, 2, 0.5, selection)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    identities = torch.tensor([2, 0])
    selection.identities = identities
    for x in (torch.randn(2, 4, 6), torch.randn(2, 6)):
        expected = torch.stack(
            [
                layer.base_layer(x[b]) + 0.5 * (x[b] @ layer.lora_A[k].T) @ layer.lora_B[k].T
                for b, k in enumerate(identities.tolist())
            ]
        )
        torch.testing.assert_close(layer(x), expected)
    with pytest.raises(ValueError, match="does not match the 2 selected identities"):
        layer(torch.randn(3, 6))


# ---------------------------------------------------------------------------- LoRA files


def test_exported_identities_load_with_diffusers_and_match_the_batched_outputs(pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    unet, handle = _batched(pipe.unet)
    _randomize(handle, 3)
    identities = torch.tensor([2, 0, 1, 0, 2])
    inputs = _inputs(len(identities))
    handle.set_identities(identities)
    with torch.no_grad():
        batched = unet(**inputs).sample
    worst = 0.0
    for k in range(K):
        folder = tmp_path / f"identity_{k}"
        StableDiffusionPipeline.save_lora_weights(
            folder,
            unet_lora_layers=ml.identity_state_dict(handle, k),
            unet_lora_adapter_metadata=_lora_metadata(handle),
            safe_serialization=True,
        )
        fresh = copy.deepcopy(pipe)
        fresh.load_lora_weights(folder)
        rows = [b for b, i in enumerate(identities.tolist()) if i == k]
        with torch.no_grad():
            solo = fresh.unet(**_rows(inputs, rows)).sample
        torch.testing.assert_close(batched[rows], solo, rtol=1e-5, atol=1e-5)
        worst = max(worst, (batched[rows] - solo).abs().max().item())
        _check_reload(pipe.unet, handle, k, folder)
    print(f"batched vs load_lora_weights, max |diff| {worst:.3g}")
    assert (batched - pipe.unet(**inputs).sample).abs().max() > 1e-2  # the LoRA matters


def _check_reload(base_unet, handle: ml.BatchedLoRA, k: int, folder: Path) -> None:
    """The file read back into another handle's identity 0 gives identity k's factors."""
    from diffusers import StableDiffusionPipeline

    state, _ = StableDiffusionPipeline.lora_state_dict(str(folder))
    state = {key.removeprefix("unet."): value for key, value in state.items()}
    _, other = _batched(base_unet, num_identities=1)
    ml.load_identity_(other, 0, state)
    for mine, theirs in zip(handle.parameters(), other.parameters(), strict=True):
        assert torch.equal(mine[k], theirs[0])


def test_load_identity_is_strict(pipe):
    _, handle = _batched(pipe.unet)
    state = ml.identity_state_dict(handle, 0)
    first = next(iter(state))
    with pytest.raises(ValueError, match="missing.*" + first.replace(".", r"\.")):
        ml.load_identity_(handle, 1, {k: v for k, v in state.items() if k != first})
    with pytest.raises(ValueError, match="unexpected.*extra.lora.down.weight"):
        ml.load_identity_(handle, 1, state | {"extra.lora.down.weight": state[first]})
    with pytest.raises(ValueError, match="wrong shapes.*" + first.replace(".", r"\.")):
        ml.load_identity_(handle, 1, state | {first: torch.zeros(RANK + 1, 8)})


# ---------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_follows_peft(pipe, dtype):
    """fp16/bf16 base, fp32 factors, autocast: per sample the same maths as peft's adapter."""
    from diffusers.training_utils import cast_training_params

    unet, handle = _batched(pipe.unet)
    _randomize(handle, 4)
    cast_training_params(unet.to(dtype), dtype=torch.float32)  # as training places the UNet
    identities = torch.tensor([1, 2, 1])
    inputs = _inputs(len(identities))
    handle.set_identities(identities)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        batched = unet(**inputs).sample
    assert handle.parameters()[0].dtype == torch.float32
    worst = 0.0
    for k in (1, 2):
        reference = _peft_unet(pipe.unet)
        _set_peft_state(reference, ml.identity_state_dict(handle, k))
        cast_training_params(reference.to(dtype), dtype=torch.float32)
        rows = [b for b, i in enumerate(identities.tolist()) if i == k]
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            solo = reference(**_rows(inputs, rows)).sample
        assert batched.dtype == solo.dtype
        worst = max(worst, (batched[rows].float() - solo.float()).abs().max().item())
    print(f"{dtype} autocast batched vs peft, max |diff| {worst:.3g}")
    assert worst <= 2e-2  # 0 on the development CPU; other kernels may reassociate sums


# ---------------------------------------------------------------------------- gradients


def _packed_loss(unet, handle, inputs, identities, num_identities) -> torch.Tensor:
    """Sum over identities of each identity's mean per-sample MSE (the packed objective)."""
    handle.set_identities(identities)
    per_sample = unet(**inputs).sample.square().mean(dim=(1, 2, 3))  # (B,)
    sums = per_sample.new_zeros(num_identities).index_add(0, identities, per_sample)
    counts = per_sample.new_zeros(num_identities).index_add(
        0, identities, torch.ones_like(per_sample)
    )
    return (sums / counts.clamp_min(1)).sum()  # identities without rows add 0; no host reads


def test_packed_gradients_equal_solo_peft_gradients(pipe):
    unet, handle = _batched(pipe.unet)
    _randomize(handle, 5)
    identities = torch.tensor([0, 1, 1, 0])  # identity 2 has no sample this step
    inputs = _inputs(len(identities))
    _packed_loss(unet, handle, inputs, identities, K).backward()
    worst = 0.0
    for k in (0, 1):
        reference = _peft_unet(pipe.unet)
        _set_peft_state(reference, ml.identity_state_dict(handle, k))
        rows = [b for b, i in enumerate(identities.tolist()) if i == k]
        reference(**_rows(inputs, rows)).sample.square().mean().backward()
        solo = [p.grad for p in reference.parameters() if p.requires_grad]
        for packed, expected in zip(handle.parameters(), solo, strict=True):
            torch.testing.assert_close(packed.grad[k], expected, rtol=1e-5, atol=1e-7)
            worst = max(worst, (packed.grad[k] - expected).abs().max().item())
    assert all(torch.equal(p.grad[2], torch.zeros_like(p[2])) for p in handle.parameters())
    print(f"packed vs solo gradients, max |diff| {worst:.3g}")


def test_a_non_finite_identity_is_frozen_and_leaves_the_others_untouched(pipe):
    """NaN factors in identity 2: its loss is NaN, 0 and 1 get their clean gradients and step."""
    identities = torch.tensor([0, 2, 1, 2])
    inputs = _inputs(len(identities))
    runs = []
    for poisoned in (False, True):
        unet, handle = _batched(pipe.unet)
        _randomize(handle, 9)
        if poisoned:
            with torch.no_grad():
                handle.parameters()[0][2, 0, 0] = float("nan")
        optimizer = ml.StackedAdamW(handle.parameters(), K, lr=LRS, **ADAMW)
        before = [p.detach().clone() for p in handle.parameters()]
        _packed_loss(unet, handle, inputs, identities, K).backward()
        grads = [p.grad.clone() for p in handle.parameters()]
        norms = optimizer.clip_grad_norm_(max_norm=1.0)
        optimizer.step(active=torch.isfinite(norms))
        runs.append((grads, norms, before, handle.parameters()))
    (clean_grads, clean_norms, _, clean_after), (grads, norms, before, after) = runs
    assert norms[2].isnan() and torch.equal(norms[:2], clean_norms[:2])
    for clean, poisoned in zip(clean_grads, grads, strict=True):
        assert torch.equal(clean[:2], poisoned[:2])
    for start, clean, poisoned in zip(before, clean_after, after, strict=True):
        assert torch.equal(poisoned[2].nan_to_num(), start[2].nan_to_num())  # frozen
        assert torch.equal(poisoned[:2], clean[:2])


def test_gradient_checkpointing_gives_the_same_gradients(pipe):
    grads = []
    for checkpointing in (False, True):
        unet, handle = _batched(pipe.unet)
        _randomize(handle, 6)
        unet.train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        identities = torch.tensor([2, 0, 2])
        loss = _packed_loss(unet, handle, _inputs(3), identities, K)
        loss.backward()  # the index is still set: the recomputed forward sees the same one
        grads.append([p.grad.clone() for p in handle.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, recomputed, rtol=0, atol=0)


def test_compiles_without_graph_breaks():
    selection = ml.IdentitySelection()
    layer = ml.BatchedLoRALinear(torch.nn.Linear(6, 5), 3, 2, 1.0, selection)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    selection.identities = torch.tensor([1, 0, 1])
    x = torch.randn(3, 4, 6)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    compiled(x).sum().backward()
    expected = [layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]
    layer.zero_grad()
    layer(x).sum().backward()
    torch.testing.assert_close(expected, [layer.lora_A.grad, layer.lora_B.grad])


def _identity_grads(handle: ml.BatchedLoRA, k: int) -> list[torch.nn.Parameter]:
    """Identity k's factor gradients as standalone parameters, in peft's parameter order."""
    params = []
    for stacked in handle.parameters():
        param = torch.nn.Parameter(stacked[k].detach().clone())
        param.grad = stacked.grad[k].clone()
        params.append(param)
    return params


def test_clip_grad_norm_equals_torch_per_identity_bit_for_bit(pipe):
    _, handle = _batched(pipe.unet)
    optimizer = ml.StackedAdamW(handle.parameters(), K, lr=LRS, **ADAMW)
    generator = torch.Generator().manual_seed(7)
    for param in handle.parameters():
        param.grad.copy_(torch.randn(param.shape, generator=generator))
        param.grad[0] *= 1e-3  # identity 0 below the max norm, 1 above it
        param.grad[2, 0] = float("nan")  # identity 2 is non-finite
    references = [_identity_grads(handle, k) for k in range(K)]
    norms = optimizer.clip_grad_norm_(max_norm=1.0)
    assert norms.shape == (K,)
    assert norms[0] < 1.0 < norms[1] and norms[2].isnan()
    for k in (0, 1):
        expected_norm = torch.nn.utils.clip_grad_norm_(references[k], max_norm=1.0)
        assert torch.equal(norms[k], expected_norm)
        for stacked, param in zip(handle.parameters(), references[k], strict=True):
            assert torch.equal(stacked.grad[k], param.grad)


# ---------------------------------------------------------------------------- StackedAdamW


def _stacked_params(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(K, RANK, 8), (K, 8, RANK), (K, RANK, 16)]
    return [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]


def _set_grads(params, step: int) -> None:
    """Random gradients, some replacing `.grad` (as a user may), some written in place."""
    generator = torch.Generator().manual_seed(100 + step)
    for index, param in enumerate(params):
        grad = torch.randn(param.shape, generator=generator) * (0.1 + step)
        if param.grad is not None and (index + step) % 2:
            param.grad.copy_(grad)
        else:
            param.grad = grad


def test_clip_and_adamw_equal_torch_per_identity_bit_for_bit_with_an_inactive_step():
    """Five steps of clip_grad_norm_ + AdamW per identity (torch.optim.AdamW(foreach=False) on
    each identity's own copies) against StackedAdamW's flat buffers: equal bit for bit."""
    stacked = _stacked_params(0)
    optimizer = ml.StackedAdamW(stacked, K, lr=LRS, **ADAMW)
    references = [[torch.nn.Parameter(p[k].detach().clone()) for p in stacked] for k in range(K)]
    torch_optimizers = [
        torch.optim.AdamW(refs, lr=LRS[k], foreach=False, **ADAMW)
        for k, refs in enumerate(references)
    ]
    inactive_at = {2: 1}  # step 2: identity 1 is frozen
    for step in range(5):
        _set_grads(stacked, step)
        for k in range(K):
            for param, ref in zip(stacked, references[k], strict=True):
                ref.grad = param.grad[k].clone()
        active = torch.ones(K, dtype=torch.bool)
        if step in inactive_at:
            active[inactive_at[step]] = False
            frozen = inactive_at[step]
            before = _identity_snapshot(optimizer, stacked, frozen)
        norms = optimizer.clip_grad_norm_(max_norm=6.0)  # clips some identities, not others
        optimizer.step(active=active)
        for k in range(K):
            if not active[k]:
                assert _identity_snapshot(optimizer, stacked, k) == before
                continue
            assert torch.equal(norms[k], torch.nn.utils.clip_grad_norm_(references[k], 6.0))
            torch_optimizers[k].step()
        for k in range(K):
            for param, ref in zip(stacked, references[k], strict=True):
                assert torch.equal(param[k], ref), (step, k, (param[k] - ref).abs().max())
                state, ref_state = optimizer.state[param], torch_optimizers[k].state[ref]
                assert torch.equal(state["exp_avg"][k], ref_state["exp_avg"])
                assert torch.equal(state["exp_avg_sq"][k], ref_state["exp_avg_sq"])
                assert state["step"][k] == ref_state["step"]
    assert optimizer.identity_steps().tolist() == [5, 4, 5]


def test_parameters_and_gradients_are_views_of_the_flat_buffers(pipe):
    """Autograd accumulates into the flat gradient, zero_grad keeps the views, and the
    optimizer's step moves the LoRA the UNet computes with."""
    unet, handle = _batched(pipe.unet)
    _randomize(handle, 10)
    optimizer = ml.StackedAdamW(handle.parameters(), K, lr=LRS, **ADAMW)
    params, buffer = handle.parameters(), optimizer.flat_grads
    assert optimizer.flat_params.shape == (K, sum(p[0].numel() for p in params))
    identities, inputs = torch.tensor([0, 1, 2]), _inputs(3)
    _packed_loss(unet, handle, inputs, identities, K).backward()
    once = buffer.clone()
    _packed_loss(unet, handle, inputs, identities, K).backward()  # accumulates in the buffer
    assert once.abs().sum() > 0 and torch.equal(buffer, 2 * once)
    with torch.no_grad():
        before = unet(**inputs).sample
    optimizer.step()
    with torch.no_grad():
        assert not torch.equal(unet(**inputs).sample, before)
    optimizer.zero_grad(set_to_none=True)
    assert buffer.abs().sum() == 0
    assert all(p.grad.untyped_storage().data_ptr() == buffer.data_ptr() for p in params)
    params[0].grad = None
    with pytest.raises(ValueError, match="parameter 0 has no gradient"):
        optimizer.step()


def _identity_snapshot(optimizer, params, k: int) -> list[bytes]:
    """Identity k's factors and optimizer state, as raw bytes (bit-for-bit comparison)."""
    tensors = [p[k] for p in params]
    for p in params:
        state = optimizer.state[p]
        if state:
            tensors += [state["exp_avg"][k], state["exp_avg_sq"][k], state["step"][k]]
    return [t.detach().contiguous().numpy().tobytes() for t in tensors]


def test_stacked_adamw_state_dict_round_trip_resumes_exactly(tmp_path):
    stacked = _stacked_params(1)
    optimizer = ml.StackedAdamW(stacked, K, lr=LRS, **ADAMW)
    for step in range(3):
        _set_grads(stacked, step)
        optimizer.step(active=torch.tensor([True, step != 1, True]))
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in stacked]
    resumed = ml.StackedAdamW(resumed_params, K, lr=1.0, **ADAMW)
    resumed.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    assert torch.equal(resumed.param_groups[0]["lr"], optimizer.param_groups[0]["lr"])
    assert torch.equal(resumed.identity_steps(), torch.tensor([3, 2, 3]))
    for step in range(3, 5):
        for params, opt in ((stacked, optimizer), (resumed_params, resumed)):
            _set_grads(params, step)
            opt.set_learning_rates(torch.tensor(LRS, dtype=torch.float64) * 0.5)
            opt.step()
    for original, copy_ in zip(stacked, resumed_params, strict=True):
        assert torch.equal(original, copy_)


def test_fp16_grad_scaler_flow_freezes_only_the_non_finite_identity():
    """unscale_ -> per-identity clip -> step(active=finite) -> update, the fp16 recipe."""
    stacked = _stacked_params(2)
    initial = [p.detach().clone() for p in stacked]
    optimizer = ml.StackedAdamW(stacked, K, lr=LRS, **ADAMW)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    loss = sum((p * torch.randn(p.shape)).sum() for p in stacked)
    scaler.scale(loss).backward()
    stacked[0].grad[1, 0, 0] = float("inf")  # identity 1 overflowed
    scaler.unscale_(optimizer)
    norms = optimizer.clip_grad_norm_(max_norm=1.0)
    optimizer.step(active=torch.isfinite(norms))
    scaler.update()
    assert scaler.get_scale() == 2.0**7
    for param, start in zip(stacked, initial, strict=True):
        assert torch.equal(param[1], start[1])
        assert not torch.equal(param[0], start[0]) and not torch.equal(param[2], start[2])
    assert optimizer.identity_steps().tolist() == [1, 0, 1]


# ---------------------------------------------------------------------------- host syncs


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_training_step_has_no_host_syncs_or_copies(pipe, device):
    """Forward, backward, clipping and AdamW of a packed step under NoHostTransfers: on "meta"
    a host-to-device copy is visible too (tests/host_syncs.py); on the CPU the values are
    checked."""
    unet = copy.deepcopy(pipe.unet).to(device)
    handle = ml.inject_batched_lora(unet, TARGETS, K, RANK, ALPHA)
    optimizer = ml.StackedAdamW(handle.parameters(), K, lr=LRS, **ADAMW)
    identities = torch.tensor([0, 2, 2, 0], device=device)
    inputs = {name: value.to(device) for name, value in _inputs(len(identities)).items()}
    present = torch.zeros(K, dtype=torch.bool, device=device).index_fill_(0, identities, True)
    with NoHostTransfers() as guard:
        _packed_loss(unet, handle, inputs, identities, K).backward()
        norms = optimizer.clip_grad_norm_(max_norm=1.0)
        optimizer.step(active=present & torch.isfinite(norms))
        optimizer.zero_grad()
    assert "aten.index_put.default" in guard.ops  # the backward of the gather ran in the guard
    optimizer_ops = len(guard.ops) - guard.ops.index("aten._foreach_norm.Scalar")
    assert optimizer_ops < 60  # whatever K and the number of LoRA tensors (here 64)
    if device == "cpu":
        assert optimizer.identity_steps().tolist() == [1, 0, 1]
    with pytest.raises(HostTransferError), NoHostTransfers():
        norms.sum().item()


# ------------------------------------------------------------------- generation: slot pool


def _saved_peft_lora(base_unet, folder: Path, rank: int, alpha: float, targets, seed: int, **extra):
    """A diffusers LoRA file of a random non-zero peft adapter, with its adapter metadata."""
    return write_random_lora(
        folder, base_unet, rank=rank, alpha=alpha, target_modules=targets, seed=seed, **extra
    )


def test_slot_pool_serves_loras_of_other_ranks_alphas_and_layers_like_diffusers(pipe, tmp_path):
    """Three LoRAs (r 4 alpha 4 on all targets, r 2 alpha 8 on to_q/to_v, rsLoRA r 3) in a
    pool of 2 slots of rank 4: each sample's output equals load_lora_weights' for its file."""
    from lora import lora_layout, read_lora_file

    files = {
        "plain": _saved_peft_lora(pipe.unet, tmp_path / "plain", 4, 4, TARGETS, 1),
        "small": _saved_peft_lora(pipe.unet, tmp_path / "small", 2, 8, ["to_q", "to_v"], 2),
        "rslora": _saved_peft_lora(pipe.unet, tmp_path / "rs", 3, 6, TARGETS, 3, use_rslora=True),
    }
    layouts = {name: lora_layout(path) for name, path in files.items()}
    assert set(layouts["plain"].scalings.values()) == {1.0}
    assert set(layouts["small"].ranks.values()) == {2}
    assert set(layouts["small"].scalings.values()) == {4.0}
    assert list(layouts["rslora"].scalings.values()) == pytest.approx([6 / 3**0.5] * 32)
    modules = sorted({m for layout in layouts.values() for m in layout.ranks})
    unet = copy.deepcopy(pipe.unet)
    handle = ml.inject_batched_lora(unet, modules, num_identities=2, rank=4, alpha=4)
    loads = []

    def load(name):
        loads.append(name)
        return read_lora_file(files[name].parent), layouts[name].scalings

    pool = ml.SlotPool(handle, load)
    inputs = _inputs(3)
    for names in (["plain", "small", "plain"], ["small", "rslora", "rslora"]):
        slots = {}
        for name in names:
            slots[name] = pool.place(name, pinned=slots.values())
        handle.set_identities(torch.tensor([slots[name] for name in names]))
        with torch.no_grad():
            batched = unet(**inputs).sample
        for row, name in enumerate(names):
            fresh = copy.deepcopy(pipe)
            fresh.load_lora_weights(files[name].parent)
            with torch.no_grad():
                solo = fresh.unet(**_rows(inputs, [row])).sample
            torch.testing.assert_close(batched[[row]], solo, rtol=1e-4, atol=5e-5)
    assert loads == ["plain", "small", "rslora"]  # "small" stayed resident; "plain" was evicted
    assert pool.resident == {"small": 1, "rslora": 0}
    with pytest.raises(RuntimeError, match="pinned"):
        pool.place("plain", pinned=[0, 1])


def test_scaled_load_refuses_what_the_handle_cannot_hold(pipe, tmp_path):
    from lora import lora_layout, read_lora_file

    path = _saved_peft_lora(pipe.unet, tmp_path / "big", 6, 6, TARGETS, 4)
    state, scalings = read_lora_file(path.parent), lora_layout(path).scalings
    _, rank_4 = _batched(pipe.unet)
    with pytest.raises(ValueError, match="ranks above 4"):
        ml.load_identity_scaled_(rank_4, 0, state, scalings)
    only_q = ml.inject_batched_lora(copy.deepcopy(pipe.unet), ["to_q"], 1, 8, 8)
    with pytest.raises(ValueError, match="keys of other layers"):
        ml.load_identity_scaled_(only_q, 0, state, scalings)


def test_scaled_load_refuses_non_float_and_non_finite_weights(pipe, tmp_path):
    """A NaN or integer file, or a scale that overflows the layer dtype, is refused and leaves
    the slot zero (the base model), never a slot that would draw black images."""
    from lora import lora_layout, read_lora_file

    path = _saved_peft_lora(pipe.unet, tmp_path / "ok", 4, 4, TARGETS, 4)
    state, scalings = read_lora_file(path.parent), lora_layout(path).scalings
    _, handle = _batched(pipe.unet)
    ml.load_identity_scaled_(handle, 0, state, scalings)  # a good file loads
    first = next(iter(state))
    cases = {
        "NaN": ({**state, first: torch.full_like(state[first], float("nan"))}, scalings, "NaN/inf"),
        "int": ({**state, first: state[first].to(torch.int32)}, scalings, "must be floats"),
        "huge scale": (state, {m: 1e39 for m in scalings}, "NaN/inf"),
    }
    for name, (weights, scales, words) in cases.items():
        ml.load_identity_scaled_(handle, 1, state, scalings)
        with pytest.raises(ValueError, match=words):
            ml.load_identity_scaled_(handle, 1, weights, scales)
        if words == "NaN/inf":  # the copy had started: the slot is zeroed again
            assert all(not p[1].any() for p in handle.parameters()), name
    assert all(p[0].isfinite().all() and p[0].any() for p in handle.parameters()[1::2])


def test_lora_layout_names_what_batched_generation_cannot_apply(pipe, tmp_path):
    from safetensors.torch import save_file

    from lora import lora_layout

    text_encoder = tmp_path / "te.safetensors"
    save_file({"text_encoder.layer.lora.down.weight": torch.zeros(4, 8)}, text_encoder)
    with pytest.raises(ValueError, match="text-encoder and other formats"):
        lora_layout(text_encoder)
    conv = tmp_path / "conv.safetensors"
    save_file({"unet.conv_in.lora.down.weight": torch.zeros(4, 4, 3, 3)}, conv)
    with pytest.raises(ValueError, match="only linear-layer LoRAs"):
        lora_layout(conv)
    dora = _saved_peft_lora(pipe.unet, tmp_path / "dora", 4, 4, TARGETS, 5, use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        lora_layout(dora)
    mixed = tmp_path / "mixed.safetensors"  # no metadata: diffusers' alpha would be ambiguous
    save_file(
        {
            "unet.a.lora.down.weight": torch.zeros(2, 8),
            "unet.a.lora.up.weight": torch.zeros(8, 2),
            "unet.b.lora.down.weight": torch.zeros(4, 8),
            "unet.b.lora.up.weight": torch.zeros(8, 4),
        },
        mixed,
    )
    with pytest.raises(ValueError, match="different ranks"):
        lora_layout(mixed)
