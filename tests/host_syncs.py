"""An instrument that fails on host syncs and host-to-device copies, for code run on "meta".

On a CPU-only machine the host and the "device" are the same memory, so a copy of a numpy
array or a Python list to the device cannot be seen there. Run the code under test on the
meta device instead (`module.to("meta")`, `torch.empty(..., device="meta")`): every tensor
made from host data then has to cross from the CPU to meta, and this guard sees it.

`NoHostTransfers()` raises `HostTransferError` on:
- a read of a device tensor's value on the host (`.item()`, `bool(t)`, `nonzero`, ...) and
  any copy from the device to the host (`.cpu()`, `.tolist()`, `.numpy()`);
- a tensor made on the device from host data: `torch.tensor`, `torch.as_tensor`,
  `torch.asarray`, `Tensor.new_tensor` of Python numbers, lists or numpy arrays;
- any copy of a host tensor to the device (`torch.from_numpy(a).to(device)`, `t.to(device)`,
  `device_tensor.copy_(host_tensor)`), whatever its size.
Python numbers used as operands (`x * 2.0`) and `torch.full` / `torch.zeros` on the device are
kernel arguments, not copies, and pass. The aten ops it let through are counted in `ops`.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class HostTransferError(RuntimeError):
    """A host sync or a host-to-device copy inside a guarded region."""


HOST_READS = {  # aten ops whose result depends on a device tensor's value read on the host
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.is_nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.equal.default,
}
COPY_TARGET_FIRST = {aten.copy_.default, aten.copy.default}  # (dst, src)
COPY_SOURCE_FIRST = {aten._copy_from.default, aten._copy_from_and_resize.default}  # (src, dst)
FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}


def _on_device(tensor: torch.Tensor) -> bool:
    return tensor.device.type != "cpu"


class _FromData(TorchFunctionMode):
    """Tensors made on the device from host data (these factories bypass aten's dispatch)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func in FROM_DATA and isinstance(result, torch.Tensor) and _on_device(result):
            data = args[1] if func is torch.Tensor.new_tensor else (args or [None])[0]
            if not (isinstance(data, torch.Tensor) and data.device == result.device):
                raise HostTransferError(
                    f"{func.__name__} made a {result.device.type} tensor from host data "
                    f"{type(data).__name__}: a host-to-device copy (make it once, before the step)"
                )
        return result


class _Copies(TorchDispatchMode):
    """Host reads and copies between the host and the device, at the aten level."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            raise HostTransferError(f"host sync: {func}")
        source, target = _copy_devices(func, args, kwargs)
        if source is not None and source.type == "cpu" and target.type != "cpu":
            raise HostTransferError(f"host-to-device copy: {func}")
        if source is not None and source.type != "cpu" and target.type == "cpu":
            raise HostTransferError(f"device-to-host copy (a host sync): {func}")
        self.ops.append(str(func))
        return func(*args, **kwargs)


def _copy_devices(func, args, kwargs) -> tuple[torch.device | None, torch.device | None]:
    """(source, target) devices of a copy op; (None, None) for any other op."""
    if func is aten._to_copy.default:
        return args[0].device, torch.device(kwargs.get("device") or args[0].device)
    if func in COPY_TARGET_FIRST:
        return args[1].device, args[0].device
    if func in COPY_SOURCE_FIRST:
        return args[0].device, args[1].device
    return None, None


class NoHostTransfers(contextlib.ExitStack):
    """`with NoHostTransfers() as guard:` raises HostTransferError on host syncs and
    host-to-device copies inside; `guard.ops` lists the aten ops that ran."""

    def __enter__(self) -> NoHostTransfers:
        super().__enter__()
        self.enter_context(_FromData())
        self._copies = self.enter_context(_Copies())
        return self

    @property
    def ops(self) -> list[str]:
        return self._copies.ops


HOST_READ_METHODS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
}


class HostReads(TorchFunctionMode):
    """Counts the reads of tensor values on the host (`.item()`, `.tolist()`, `.numpy()`,
    `.cpu()`, `.to("cpu")`, `bool` / `int` / `float` / index of a tensor): on a GPU each is one
    device-to-host copy and sync. On the CPU it counts the same calls (host and device are one
    memory there, so it cannot tell a host tensor's read from a device tensor's: count only a
    region that reads device state). `reads` lists them by name."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_host = func is torch.Tensor.to and any(
            str(value) == "cpu" for value in (*args[1:], *kwargs.values())
        )
        if func in HOST_READ_METHODS or to_host:
            self.reads.append(func.__name__)
        return func(*args, **kwargs)
