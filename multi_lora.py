"""K identities' LoRAs in one UNet: batched LoRA layers, exact per-identity init, I/O and AdamW.

Each targeted `nn.Linear` of the UNet becomes a `BatchedLoRALinear` holding stacked factors
A (K, r, in) and B (K, out, r); every sample of a batch picks its identity's factors through
one (B,) long index shared by all layers (`BatchedLoRA.set_identities`):

    y_b = base(x_b) + (alpha / r) * (x_b A[idx_b]^T) B[idx_b]^T

Per identity everything equals an ordinary peft LoRA (`unet.add_adapter(LoraConfig(...))`):
the gaussian init for a seed (`init_identity_`), the diffusers LoRA file
(`identity_state_dict` / `load_identity_`), the forward under autocast, and gradient clipping
and AdamW (`StackedAdamW`: flat (K, P) buffers, a few dozen ops a step for all K identities,
with a per-identity active mask so a non-finite identity is frozen while the others train).
Nothing here reads a tensor on the host.
For generation, `slot_pool_for_layouts` builds one batched LoRA for any set of LoRA file
layouts and a `SlotPool` that loads each identity into a slot on demand (`place_identities`:
a batch's identities, recording the ones whose file fails to load).

A training step for a packed batch (identity losses summed, so each identity gets exactly its
solo gradient; with fp16, `scaler.unscale_(optimizer)` first, then `scaler.update()` after the
step instead of `scaler.step`):

    optimizer = StackedAdamW(lora.parameters(), K, lr=...)  # once, after the UNet is placed
    lora.set_identities(identities)                       # (B,) long, on the UNet's device
    loss = objective_of_each(...)["loss"].sum()         # losses.py: each identity's own
    loss.backward()
    norms = optimizer.clip_grad_norm_(max_norm)           # (K,)
    optimizer.step(active=present & torch.isfinite(norms))
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from peft import LoraConfig

    from lora import LoraLayout


class IdentitySelection:
    """The (B,) identity index of the current batch, shared by all layers of one UNet; or one
    identity for every sample, whatever the batch size (validation, generation pipelines)."""

    def __init__(self) -> None:
        self.identities: torch.Tensor | None = None
        self.everyone: int | None = None
        self._broadcast: torch.Tensor | None = None

    def current(self, batch_size: int, device: torch.device) -> torch.Tensor:
        if self.everyone is not None:
            if self._broadcast is None or self._broadcast.shape[0] != batch_size:
                self._broadcast = torch.full((batch_size,), self.everyone, device=device)
            return self._broadcast
        if self.identities is None:
            raise RuntimeError(
                "no identities selected: call set_identities(identities) before the forward"
            )
        return self.identities


class BatchedLoRALinear(nn.Module):
    """`base(x) + scaling * B[idx] A[idx] x` per sample; A (K, r, in), B (K, out, r) in `dtype`
    (fp32 for training; the base's dtype for generation, as load_lora_weights loads one)."""

    def __init__(
        self,
        base_layer: nn.Linear,
        num_identities: int,
        rank: int,
        scaling: float,
        selection: IdentitySelection,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        factory = dict(device=base_layer.weight.device, dtype=dtype)
        self.lora_A = nn.Parameter(
            torch.zeros(num_identities, rank, base_layer.in_features, **factory)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(num_identities, base_layer.out_features, rank, **factory)
        )
        self.scaling = scaling
        self.selection = selection
        # (K,) float32 scaling of each slot, set by load_identity_scaled_ (generation, where
        # each slot holds a LoRA of its own alpha and strength); None: `scaling` for all.
        self.register_buffer("slot_scaling", None, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ..., in) -> (B, ..., out); sample b uses identity `identities[b]`."""
        identities = self.selection.current(x.shape[0], self.lora_A.device)
        if x.dim() < 2 or identities.shape[0] != x.shape[0]:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not match the {identities.shape[0]} "
                "selected identities (one per sample; repeat them for classifier-free guidance)"
            )
        if identities.device != self.lora_A.device:
            raise ValueError(
                f"identities are on {identities.device}, the LoRA factors on "
                f"{self.lora_A.device}; move them first (an implicit copy would sync)"
            )
        result = self.base_layer(x)
        result_dtype = result.dtype
        # As peft: the input is cast to the factors' dtype; under autocast bmm then runs in the
        # autocast dtype exactly like peft's nn.Linear factors do.
        hidden = x.to(self.lora_A.dtype).reshape(x.shape[0], -1, x.shape[-1])  # (B, N, in)
        down = self.lora_A[identities].transpose(1, 2)  # (B, in, r)
        up = self.lora_B[identities].transpose(1, 2)  # (B, r, out)
        delta = torch.bmm(torch.bmm(hidden, down), up)  # (B, N, out)
        if self.slot_scaling is None:
            delta = delta * self.scaling
        else:  # as peft's `product * scaling`: in fp32, rounded once to the product's dtype
            scaling = self.slot_scaling[identities].view(-1, 1, 1)
            delta = (delta.float() * scaling).to(delta.dtype)
        return (result + delta.reshape(result.shape)).to(result_dtype)

    def extra_repr(self) -> str:
        identities, rank, _ = self.lora_A.shape
        return f"identities={identities}, rank={rank}, scaling={self.scaling}"


@dataclass
class BatchedLoRA:
    """Handle of the batched LoRA injected into one UNet (`inject_batched_lora`)."""

    unet: nn.Module
    layers: dict[str, BatchedLoRALinear]  # module name -> layer, in named_modules order
    selection: IdentitySelection
    num_identities: int
    rank: int
    alpha: float
    target_modules: list[str]
    _removed: bool = field(default=False, repr=False)

    def set_identities(self, identities: torch.Tensor) -> None:
        """Select (B,) long identity indices for the following forwards (and their backward).

        It stays set until the next call, since gradient checkpointing re-runs the forward
        during backward and must see the same index.
        """
        if identities.dim() != 1 or identities.dtype != torch.long:
            raise ValueError(
                f"identities must be a (B,) long tensor, got {identities.dtype} of shape "
                f"{tuple(identities.shape)}"
            )
        self.selection.identities = identities
        self.selection.everyone = None

    def select_everyone(self, k: int) -> None:
        """Every sample of the following forwards uses identity k (any batch size)."""
        _check_identity(self, k)
        self.selection.everyone, self.selection._broadcast = k, None

    def parameters(self) -> list[nn.Parameter]:
        """Stacked factors in peft's parameter order: A (K, r, in), B (K, out, r) per module."""
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]

    def remove(self) -> None:
        """Put the original nn.Linear modules back (the factors are dropped)."""
        for name, layer in self.layers.items():
            parent, child = _parent_and_child(self.unet, name)
            setattr(parent, child, layer.base_layer)
        self.layers = {}
        self.selection.identities = None
        self._removed = True


def _matches_target(name: str, target_modules: Sequence[str]) -> bool:
    """peft's rule for a list of target names: the module name equals or ends with '.target'."""
    return any(name == target or name.endswith("." + target) for target in target_modules)


def _parent_and_child(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def inject_batched_lora(
    unet: nn.Module,
    target_modules: Sequence[str],
    num_identities: int,
    rank: int,
    alpha: float,
    dtype: torch.dtype = torch.float32,
) -> BatchedLoRA:
    """Replace every targeted nn.Linear with a BatchedLoRALinear (B = 0, A = 0) in place, its
    factors in `dtype` (fp32: trainable under autocast, as peft's cast_training_params).

    Like peft's add_adapter, every other parameter of the UNet is frozen. Initialise each
    identity with `init_identity_` (or `load_identity_`) afterwards.
    """
    if num_identities < 1 or rank < 1:
        raise ValueError(f"num_identities and rank must be >= 1, got {num_identities}, {rank}")
    names = [name for name, _ in unet.named_modules() if name]
    targeted = [name for name in names if _matches_target(name, target_modules)]
    if not targeted:
        raise ValueError(f"no module of the UNet matches target_modules {list(target_modules)}")
    not_linear = [n for n in targeted if type(unet.get_submodule(n)) is not nn.Linear]
    if not_linear:
        raise ValueError(f"batched LoRA supports nn.Linear only; targeted: {not_linear[:4]}")
    unet.requires_grad_(False)
    selection = IdentitySelection()
    layers: dict[str, BatchedLoRALinear] = {}
    for name in targeted:
        parent, child = _parent_and_child(unet, name)
        layers[name] = BatchedLoRALinear(
            getattr(parent, child), num_identities, rank, alpha / rank, selection, dtype
        )
        setattr(parent, child, layers[name])
    return BatchedLoRA(
        unet, layers, selection, num_identities, rank, alpha, sorted(set(target_modules))
    )


def lora_config(handle: BatchedLoRA) -> LoraConfig:
    """The peft LoraConfig one identity's adapter has (for the LoRA file's metadata)."""
    from peft import LoraConfig

    return LoraConfig(
        r=handle.rank,
        lora_alpha=handle.alpha,
        init_lora_weights="gaussian",
        target_modules=list(handle.target_modules),
    )


def _check_identity(handle: BatchedLoRA, k: int) -> None:
    if handle._removed:
        raise RuntimeError("this batched LoRA was removed from its UNet")
    if not 0 <= k < handle.num_identities:
        raise IndexError(f"identity {k} out of range for {handle.num_identities} identities")


@torch.no_grad()
def init_identity_(handle: BatchedLoRA, k: int, seed: int) -> None:
    """Identity k's factors = peft's gaussian init after `torch.manual_seed(seed)`, bit for bit.

    peft's add_adapter visits the targeted modules in named_modules order and for each builds
    nn.Linear(in, r) and nn.Linear(r, out) (their default kaiming-uniform init draws from the
    CPU generator), then redraws A ~ N(0, (1/r)^2) and zeroes B. The same draws are replayed
    here on a forked CPU generator, so the caller's RNG state is untouched.
    """
    _check_identity(handle, k)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in handle.layers.values():
            down = nn.Linear(layer.in_features, handle.rank, bias=False, device="cpu")
            nn.Linear(handle.rank, layer.out_features, bias=False, device="cpu")  # B's draws
            nn.init.normal_(down.weight, std=1 / handle.rank)
            layer.lora_A[k].copy_(down.weight)
            layer.lora_B[k].zero_()


def _peft_keys(name: str) -> tuple[str, str]:
    """get_peft_model_state_dict's names of a module's A and B (adapter name removed)."""
    return f"{name}.lora_A.weight", f"{name}.lora_B.weight"


@torch.no_grad()
def identity_state_dict(handle: BatchedLoRA, k: int) -> dict[str, torch.Tensor]:
    """Identity k as `convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))` gives it.

    Values are fp32 copies: A (r, in) under '...lora.down.weight', B (out, r) under
    '...lora.up.weight'; `StableDiffusionPipeline.save_lora_weights(dir, unet_lora_layers=...)`
    writes the ordinary per-identity file.
    """
    from diffusers.utils import convert_state_dict_to_diffusers

    _check_identity(handle, k)
    peft_state: dict[str, torch.Tensor] = {}
    for name, layer in handle.layers.items():
        key_a, key_b = _peft_keys(name)
        peft_state[key_a] = layer.lora_A[k].detach().clone()
        peft_state[key_b] = layer.lora_B[k].detach().clone()
    return convert_state_dict_to_diffusers(peft_state)


def _diffusers_targets(handle: BatchedLoRA) -> dict[str, nn.Parameter]:
    """Diffusers key of each factor -> its stacked parameter (the key's tensor is param[k])."""
    from diffusers.utils import convert_state_dict_to_diffusers

    stacked: dict[str, nn.Parameter] = {}
    for name, layer in handle.layers.items():
        key_a, key_b = _peft_keys(name)
        stacked[key_a], stacked[key_b] = layer.lora_A, layer.lora_B
    return dict(convert_state_dict_to_diffusers(stacked))


@torch.no_grad()
def load_identity_(handle: BatchedLoRA, k: int, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy a diffusers-format LoRA state dict (no 'unet.' prefix) into identity k, strictly.

    ValueError naming the missing and unexpected keys and the wrong shapes; nothing is copied
    then.
    """
    _check_identity(handle, k)
    targets = _diffusers_targets(handle)
    missing = sorted(set(targets) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(targets))
    wrong_shapes = [
        f"{key}: {tuple(state_dict[key].shape)} != {tuple(param.shape[1:])}"
        for key, param in targets.items()
        if key in state_dict and tuple(state_dict[key].shape) != tuple(param.shape[1:])
    ]
    if missing or unexpected or wrong_shapes:
        raise ValueError(
            f"LoRA state dict does not match the batched LoRA: missing {missing[:4]} "
            f"({len(missing)}), unexpected {unexpected[:4]} ({len(unexpected)}), "
            f"wrong shapes {wrong_shapes[:4]} ({len(wrong_shapes)})"
        )
    for key, param in targets.items():
        param[k].copy_(state_dict[key])


@torch.no_grad()
def load_identity_scaled_(
    handle: BatchedLoRA,
    k: int,
    state_dict: Mapping[str, torch.Tensor],
    scalings: Mapping[str, float],
) -> None:
    """Identity k from a diffusers-format LoRA (keys '<module>.lora.down/up.weight') of any
    rank <= handle.rank on any subset of the batched layers, with each module's scaling
    (its file's alpha / r times a LoRA strength) set as slot k's scaling of that layer and
    applied to the product at run time, as peft does (folding it into B would round B * s in
    fp16), for generation, where one batched layer serves LoRAs trained with other settings.
    Padded ranks and layers the file lacks stay zero. ValueError for layers the handle lacks
    or ranks above its own."""
    _check_identity(handle, k)
    targets = _diffusers_targets(handle)
    unexpected = sorted(set(state_dict) - set(targets))
    too_large = [
        key
        for key, value in state_dict.items()
        if key in targets and value.shape[0 if key.endswith("down.weight") else 1] > handle.rank
    ]
    if unexpected or too_large:
        raise ValueError(
            f"LoRA does not fit the batched layers: keys of other layers {unexpected[:4]} "
            f"({len(unexpected)}), ranks above {handle.rank}: {too_large[:4]}"
        )
    not_float = [
        f"{key} ({value.dtype})"
        for key, value in state_dict.items()
        if key in targets and not value.is_floating_point()
    ]
    if not_float:
        raise ValueError(f"LoRA tensors must be floats: {not_float[:4]} ({len(not_float)})")
    fp32_max = torch.finfo(torch.float32).max
    if not all(math.isfinite(value) and abs(value) <= fp32_max for value in scalings.values()):
        for param in targets.values():
            param[k].zero_()
        raise ValueError(
            "LoRA weights are NaN/inf once scaled (alpha / r x --lora_scale): a scaling is "
            f"beyond float32 ({max(scalings.values(), key=abs):.3g}); its scale is too large"
        )
    layer_of = {id(layer.lora_B): layer for layer in handle.layers.values()}
    for key, param in targets.items():
        param[k].zero_()
        value = state_dict.get(key)
        if value is None:
            continue
        module = key.rsplit(".lora.", 1)[0]
        if key.endswith("down.weight"):  # A (r, in)
            param[k, : value.shape[0]].copy_(value)
        else:  # B (out, r)
            param[k, :, : value.shape[1]].copy_(value)
            _slot_scaling(layer_of[id(param)])[k] = scalings[module]
    _check_finite_identity(k, targets, scalings)


def _slot_scaling(layer: BatchedLoRALinear) -> torch.Tensor:
    """The layer's (K,) per-slot scaling, created (all 1) at its first use."""
    if layer.slot_scaling is None:
        layer.slot_scaling = torch.ones(
            layer.lora_A.shape[0], dtype=torch.float32, device=layer.lora_A.device
        )
    return layer.slot_scaling


def _check_finite_identity(
    k: int, targets: Mapping[str, nn.Parameter], scalings: Mapping[str, float]
) -> None:
    """ValueError (slot k zeroed) when identity k's loaded weights, or its B factors times their
    scaling, hold NaN/inf in the layer's dtype: a NaN file, or a scale that overflows it, would
    only make black images."""
    dtype = next(iter(targets.values())).dtype
    bad = []
    for key, param in targets.items():
        scale = scalings.get(key.rsplit(".lora.", 1)[0], 1.0) if key.endswith("up.weight") else 1.0
        if not bool((param[k].float() * scale).to(dtype).isfinite().all()):
            bad.append(key)
    if bad:
        for param in targets.values():
            param[k].zero_()
        raise ValueError(
            f"LoRA weights are NaN/inf once scaled (alpha / r x --lora_scale) in {dtype}: "
            f"{bad[:3]} ({len(bad)} tensors); the file is broken or its scale too large"
        )


class SlotPool:
    """Named LoRAs resident in the K slots of one batched LoRA, loaded on demand.

    For generation over more identities than slots: `place(name, pinned)` returns the slot
    holding `name`, loading it with `load(name) -> (state_dict, scalings)` into the least
    recently used slot outside `pinned` (the slots the current batch already uses).
    """

    def __init__(self, handle: BatchedLoRA, load: Any) -> None:
        self.handle, self.load = handle, load
        self.resident: dict[str, int] = {}  # name -> slot, least recently used first

    def place(self, name: str, pinned: Iterable[int] = ()) -> int:
        if name in self.resident:
            self.resident[name] = self.resident.pop(name)  # most recently used now
            return self.resident[name]
        pinned = set(pinned)
        used = set(self.resident.values())
        free = [slot for slot in range(self.handle.num_identities) if slot not in used]
        if not free:
            evictable = [n for n, slot in self.resident.items() if slot not in pinned]
            if not evictable:
                raise RuntimeError(f"all {self.handle.num_identities} slots are pinned")
            free = [self.resident.pop(evictable[0])]
        state_dict, scalings = self.load(name)
        load_identity_scaled_(self.handle, free[0], state_dict, scalings)
        self.resident[name] = free[0]
        return free[0]


def place_identities(pool: Any, names: Sequence[str], errors: dict[str, str]) -> dict[str, int]:
    """identity -> LoRA slot for the usable identities of a batch, loading them as needed; a
    LoRA that fails to load joins `errors` (its identity is skipped from then on)."""
    slots: dict[str, int] = {}
    for name in dict.fromkeys(names):
        if name in errors:
            continue
        try:
            slots[name] = pool.place(name, pinned=slots.values())
        except Exception as error:  # safetensors/torch raise many types for a corrupt file
            errors[name] = f"identity {name!r}: loading its LoRA failed: {error}"
    return slots


def slot_pool_for_layouts(
    unet: nn.Module, layouts: Mapping[str, LoraLayout], num_slots: int, load: Any
) -> tuple[BatchedLoRA | None, SlotPool | None]:
    """A batched LoRA of `num_slots` slots over the union of the layouts' layers (rank: their
    largest; alpha = rank, so each identity's own scaling comes with its `load`) and the
    SlotPool that fills it on demand; (None, None) when no layout holds a layer.

    The factors take the UNet's dtype, as `load_lora_weights` loads an adapter, and each
    slot's scaling multiplies the product at run time: in fp16 the LoRA path then rounds where
    peft's does (fp16 factors, fp16 products, the scaled product, an fp16 sum), so a batch of
    one equals the stock pipeline bit for bit; fp32 factors would round once, at the sum, and
    differ by a grey level on about 13 % of pixels (tests/test_inference.py)."""
    modules = sorted({module for layout in layouts.values() for module in layout.ranks})
    rank = max((r for layout in layouts.values() for r in layout.ranks.values()), default=1)
    if not modules:
        return None, None
    lora = inject_batched_lora(unet, modules, num_slots, rank, alpha=rank, dtype=unet.dtype)
    return lora, SlotPool(lora, load)


# A parameter that is a column block of a (K, P) buffer is not dense, so autograd's in-place
# accumulation into its gradient view warns once that the "layout contract" is not met; the
# accumulation is still in place (one strided add per step, a few MB).
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout")


class FlatStack:
    """T stacked (K, ...) tensors side by side as column blocks of one (K, P) buffer, so that
    a per-identity update is one elementwise op over (K, P) with (K, 1) per-identity factors.

    Tensor t of shape (K, *s_t) is columns [offset_t, offset_t + prod(s_t)) of the buffer; its
    view (`views`) has the tensor's shape and row k is identity k's factor."""

    def __init__(self, shapes: Sequence[torch.Size]) -> None:
        self.shapes = [torch.Size(shape) for shape in shapes]
        self.sizes = [shape[1:].numel() for shape in self.shapes]
        self.offsets = [sum(self.sizes[:t]) for t in range(len(self.sizes))]
        self.width = sum(self.sizes)  # P

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The T (K, *s_t) views of a (K, P) buffer (strides (P, ...): no copies)."""
        return [
            flat[:, offset : offset + size].view(shape)
            for offset, size, shape in zip(self.offsets, self.sizes, self.shapes, strict=True)
        ]

    def identity_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The K * T contiguous (*s_t) views of a (K, P) buffer, identity-major: identity k's
        tensors are entries [k * T, (k + 1) * T)."""
        return [
            flat[k, offset : offset + size].view(shape[1:])
            for k in range(flat.shape[0])
            for offset, size, shape in zip(self.offsets, self.sizes, self.shapes, strict=True)
        ]


class StackedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW (amsgrad off) and clip_grad_norm_ per identity over stacked (K, ...)
    params, each step a few dozen ops over flat (K, P) buffers whatever K and the tensor count.

    At construction the parameters' values, gradients and AdamW moments move into (K, P)
    buffers (`FlatStack`): every parameter (and its `.grad`) becomes a view of them, so
    autograd accumulates into the flat gradient, and `zero_grad` zeroes it in place (the views
    stay; `set_to_none` is ignored). Do not reassign a parameter's `.data` afterwards. A
    `.grad` replaced by another tensor is copied back into the buffer at the next
    `clip_grad_norm_` / `step`.

    Each identity has its own step count and learning rate (group["lr"], a (K,) float64 tensor
    on the parameters' device: set it from the identity's own schedule position, e.g. with
    `set_learning_rates`; torch's LR schedulers do not apply). `step(active)` updates only the
    identities where the (K,) bool mask is True; the others keep their factors and state bit
    for bit. An identity with zero gradient (no samples in the batch) still decays, as in
    AdamW, so mark it inactive. Per identity, the results equal torch.optim.AdamW(foreach=
    False) and clip_grad_norm_ bit for bit on the CPU (tests/test_multi_lora.py).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        num_identities: int,
        lr: float | Sequence[float] | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        self.num_identities = num_identities
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(f"one parameter group, got {len(self.param_groups)}")
        params = self.param_groups[0]["params"]
        kinds = {(p.dtype, p.device) for p in params}
        if len(kinds) != 1:
            raise ValueError(f"every parameter must share one dtype and device, got {kinds}")
        self.layout = FlatStack([p.shape for p in params])
        self.flat_params = torch.cat([p.detach().reshape(num_identities, -1) for p in params], 1)
        self.flat_grads = torch.zeros_like(self.flat_params)
        self.exp_avg = torch.zeros_like(self.flat_params)
        self.exp_avg_sq = torch.zeros_like(self.flat_params)
        self.steps = torch.zeros(num_identities, dtype=torch.long, device=params[0].device)
        self._grads = self.layout.views(self.flat_grads)
        self._identity_grads = self.layout.identity_views(self.flat_grads)  # for the norms
        for param, value, grad in zip(
            params, self.layout.views(self.flat_params), self._grads, strict=True
        ):
            if param.grad is not None:
                grad.copy_(param.grad)
            param.data, param.grad = value, grad
        self._point_state_at_buffers()

    def _point_state_at_buffers(self) -> None:
        """state[param] = the param's views of the moments and the shared (K,) step counts."""
        params = self.param_groups[0]["params"]
        moments = zip(
            self.layout.views(self.exp_avg), self.layout.views(self.exp_avg_sq), strict=True
        )
        for param, (exp_avg, exp_avg_sq) in zip(params, moments, strict=True):
            self.state[param] = {"step": self.steps, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Optimizer.add_param_group; every parameter stacked (K, ...), lr made a (K,) vector."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        K = self.num_identities
        bad = [tuple(p.shape) for p in group["params"] if p.dim() < 1 or p.shape[0] != K]
        if bad:
            raise ValueError(f"every parameter must have a leading dim of {K}: {bad}")
        group["lr"] = self._lr_vector(group["lr"], group["params"][0].device)

    def _lr_vector(self, lr: Any, device: torch.device) -> torch.Tensor:
        """(K,) float64 on device; float64 so that a float lr gives torch's Python-float maths."""
        lr = torch.as_tensor(lr, dtype=torch.float64).to(device)
        if lr.dim() == 0:
            lr = lr.expand(self.num_identities)
        if lr.shape != (self.num_identities,):
            raise ValueError(f"lr must be a float or ({self.num_identities},), got {lr.shape}")
        return lr.clone()

    def set_learning_rates(self, lr: float | Sequence[float] | torch.Tensor) -> None:
        """Set the (K,) learning rates (from a device tensor: no host-to-device copy)."""
        group = self.param_groups[0]
        group["lr"].copy_(self._lr_vector(lr, group["lr"].device))

    def identity_steps(self) -> torch.Tensor:
        """(K,) long: how many updates each identity has had (for its schedule position)."""
        return self.steps.clone()

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient in place (one op); the parameters keep their gradient views."""
        self._adopt_gradients()
        self.flat_grads.zero_()

    def _adopt_gradients(self) -> None:
        """Copy a `.grad` that was replaced (not a view of the buffer) back into the buffer."""
        for index, (param, view) in enumerate(
            zip(self.param_groups[0]["params"], self._grads, strict=True)
        ):
            if param.grad is view:
                continue
            if param.grad is None:
                raise ValueError(
                    f"parameter {index} has no gradient: StackedAdamW updates all of its "
                    "parameters together (their gradients live in its flat buffer)"
                )
            view.copy_(param.grad)
            param.grad = view

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Optimizer.load_state_dict, then the state back into the flat buffers and the
        learning rates onto the params' device."""
        super().load_state_dict(state_dict)
        group = self.param_groups[0]
        group["lr"] = self._lr_vector(group["lr"], self.flat_params.device)
        loaded = [self.state[param] for param in group["params"]]
        self.steps.copy_(loaded[0]["step"])
        for state, exp_avg, exp_avg_sq in zip(
            loaded, self.layout.views(self.exp_avg), self.layout.views(self.exp_avg_sq), strict=True
        ):
            exp_avg.copy_(state["exp_avg"])
            exp_avg_sq.copy_(state["exp_avg_sq"])
        self._point_state_at_buffers()

    def identity_state(self, k: int) -> list[dict[str, torch.Tensor]]:
        """Identity k's AdamW state, one {step, exp_avg, exp_avg_sq} per parameter (in order):
        what an ordinary per-identity checkpoint holds."""
        return [
            {name: value[k].detach().clone() for name, value in self.state[param].items()}
            for param in self.param_groups[0]["params"]
        ]

    @torch.no_grad()
    def load_identity_state(self, k: int, rows: list[dict[str, torch.Tensor]] | None) -> None:
        """Put identity k's state back (identity_state's output), or zero it (None: a fresh
        identity in slot k). ValueError when the rows do not fit the parameters."""
        if rows is None:
            for buffer in (self.exp_avg, self.exp_avg_sq, self.steps):
                buffer[k].zero_()
            return
        params = self.param_groups[0]["params"]
        if len(rows) != len(params):
            raise ValueError(f"{len(rows)} saved optimizer states for {len(params)} parameters")
        for row, param in zip(rows, params, strict=True):
            for name, value in self.state[param].items():
                if row[name].shape != value[k].shape:
                    raise ValueError(
                        f"saved {name} {tuple(row[name].shape)} != {tuple(value[k].shape)}"
                    )
        for row, param in zip(rows, params, strict=True):
            for name, value in self.state[param].items():
                value[k].copy_(row[name])

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Per identity, torch.nn.utils.clip_grad_norm_ over its own factors; (K,) norms.

        norm_k = || (||g_kt||_2 for each tensor t) ||_2 (torch's order of reductions), and
        identity k's gradients are scaled by min(max_norm / (norm_k + 1e-6), 1), on the
        device. A non-finite identity gets a non-finite norm; the others are untouched by it.
        """
        self._adopt_gradients()
        K, T = self.num_identities, len(self._grads)
        per_tensor = torch.stack(torch._foreach_norm(self._identity_grads)).view(K, T)
        norms = torch.linalg.vector_norm(per_tensor, 2, dim=1)  # (K,)
        coefficients = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
        self.flat_grads.mul_(coefficients[:, None])
        return norms

    @torch.no_grad()
    def step(self, active: torch.Tensor | None = None) -> None:  # type: ignore[override]
        """One AdamW update of the identities where `active` (K,) bool is True (default all).

        torch's _single_tensor_adam on the (K, P) buffers, its per-identity Python-float
        scalars computed in float64 as (K, 1) factors, then cast to float32 as its kernels do.
        """
        self._adopt_gradients()
        if active is None:
            active = torch.ones_like(self.steps, dtype=torch.bool)
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        steps = self.steps + active  # (K,)
        powers, lr = steps.double(), group["lr"]
        dtype = self.flat_params.dtype
        decay = (1 - lr * group["weight_decay"]).to(dtype)[:, None]
        step_size = (lr / (1 - beta1**powers)).neg().to(dtype)[:, None]
        bias_correction2_sqrt = (1 - beta2**powers).sqrt().to(dtype)[:, None]

        param, grad = self.flat_params, self.flat_grads
        new_param = param * decay
        new_exp_avg = self.exp_avg.lerp(grad, 1 - beta1)
        new_exp_avg_sq = self.exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (new_exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
        # addcdiv_(exp_avg, denom, value=-step_size) computes self + value * t1 / t2.
        new_param = new_param + step_size * new_exp_avg / denom

        keep = active[:, None]
        param.copy_(torch.where(keep, new_param, param))
        self.exp_avg.copy_(torch.where(keep, new_exp_avg, self.exp_avg))
        self.exp_avg_sq.copy_(torch.where(keep, new_exp_avg_sq, self.exp_avg_sq))
        self.steps.copy_(steps)


def schedule_table(
    name: str, learning_rate: float, total_steps: int, **options: Any
) -> torch.Tensor:
    """(total_steps + 1,) float64: the learning rate of update u (0-based) under diffusers'
    schedule `name` (get_scheduler's LambdaLR, evaluated on the host once), for StackedAdamW:
    index it with an identity's step count on the device, no host sync per step."""
    from diffusers.optimization import get_scheduler

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=learning_rate)
    schedule = get_scheduler(name, probe, num_training_steps=total_steps, **options)
    factor = schedule.lr_lambdas[0]
    return torch.tensor(
        [learning_rate * factor(u) for u in range(total_steps + 1)], dtype=torch.float64
    )
