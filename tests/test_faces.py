"""faces.py's torch alignment inside the training step: no host syncs, no host-to-device copies.

The guard (tests/host_syncs.py) runs the code on the meta device, where every tensor made from
host data has to cross from the CPU and is seen.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from host_syncs import HostTransferError, NoHostTransfers

import faces

DEVICE = torch.device("meta")


@pytest.mark.parametrize(
    "make",
    [
        lambda x: torch.tensor([1.0, 2.0], device=x.device),
        lambda x: torch.as_tensor(faces.ARCFACE_DST, device=x.device),
        lambda x: torch.from_numpy(np.ones(3, np.float32)).to(x.device),
        lambda x: x.new_tensor([64.0, 80.0]),
        lambda x: x.copy_(torch.zeros(x.shape)),
        lambda x: x + torch.ones(x.shape).to(x.device),
        lambda x: x.cpu(),
        lambda x: x.sum().item(),
        lambda x: bool(x.sum() > 0),
        lambda x: x.nonzero(),
    ],
    ids=[
        "tensor-list",
        "as_tensor-numpy",
        "from_numpy-to",
        "new_tensor",
        "copy_-host",
        "to-device",
        "cpu",
        "item",
        "bool",
        "nonzero",
    ],
)
def test_the_guard_sees_every_host_copy_and_sync(make):
    x = torch.empty(3, device=DEVICE)
    with pytest.raises(HostTransferError), NoHostTransfers():
        make(x)


def test_the_guard_lets_device_work_and_python_operands_through():
    x = torch.empty(3, device=DEVICE)
    with NoHostTransfers() as guard:
        y = (x * 2.0 + torch.full((3,), 0.5, device=DEVICE)).clamp(max=1.0)
        z = torch.as_tensor(y) + torch.zeros(3, device=DEVICE)  # already there: no copy
    assert z.device == DEVICE and "aten.mul.Tensor" in guard.ops


def test_torch_alignment_makes_no_host_copies_once_its_template_is_on_the_device():
    """The ArcFace template is copied to a device once (the first call there); afterwards the
    alignment, forward and backward, is pure device work."""
    images = torch.empty(3, 3, 64, 80, device=DEVICE, requires_grad=True)
    landmarks = torch.empty(3, 5, 2, device=DEVICE)
    faces.align_faces_torch(images, landmarks)  # first call on this device: the constant
    with NoHostTransfers() as guard:
        aligned = faces.align_faces_torch(images, landmarks, fill=-1.0)
        aligned.sum().backward()
        faces.similarity_transform_torch(landmarks)
    assert aligned.shape == (3, 3, 112, 112)
    assert "aten.grid_sampler_2d_backward.default" in guard.ops
    assert faces.arcface_template_on(DEVICE) is faces.arcface_template_on(DEVICE)
