"""Lightly's ``MemoryBankModule`` with a masked, synchronisation-free enqueue (internal)."""

from __future__ import annotations

import torch
from lightly.models.modules.memory_bank import MemoryBankModule
from torch import Tensor
from torch import distributed as torch_dist

from . import _distributed as ddp

__all__ = ["KeyMemoryBank"]


class KeyMemoryBank(MemoryBankModule):
    """The queue of keys of MoCo / PCL: Lightly's ``MemoryBankModule`` (same layout, same update rule).

    Two differences from Lightly's ``_dequeue_and_enqueue``, neither of which changes its result on finite
    keys:

    - the update is computed on the device with ``torch.where`` (no ``int(bank_ptr)``), so it costs no
      host-device synchronisation, and it can be masked: with ``accept`` false the bank and its pointer are
      left unchanged (the state is never written from a non-finite batch, docs/reliability.md);
    - with ``gather`` the keys of all ranks are concatenated in rank order before the update, as the
      official MoCo / PCL code does, also for uneven last batches; ``accept`` is then the AND over ranks,
      so every rank keeps the same bank.

    As in Lightly, a batch that reaches the end of the queue fills it up to the end and the pointer returns to
    0 (the rest of the batch is dropped).
    """

    @torch.no_grad()
    def enqueue(self, keys: Tensor, accept: Tensor | None = None, gather: bool = False) -> None:
        """Write ``keys`` ``(B, D)`` at the pointer; leave the state unchanged where ``accept`` is false.

        Args:
            keys: The (normalised) keys of this rank.
            accept: Scalar boolean tensor on the keys' device, or ``None`` (always accept).
            gather: Concatenate the keys of all ranks first (no-op without a process group).
        """
        if gather and ddp.is_distributed():
            keys = ddp.all_gather_variable(keys.contiguous())
            if accept is not None:
                flag = accept.to(torch.int32).reshape(1)
                torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MIN)
                accept = flag[0].bool()
        size, count = self.size[0], keys.shape[0]
        if count == 0:
            return
        ptr = self.bank_ptr.to(keys.device)
        next_ptr = torch.where(ptr + count >= size, torch.zeros_like(ptr), ptr + count)
        if accept is not None:
            next_ptr = torch.where(accept, next_ptr, ptr)
        keys = keys.detach().to(self.bank.dtype)
        if count <= size:  # touch the batch's rows only: positions ptr.. (mod size) are distinct
            position = ptr + torch.arange(count, device=keys.device)
            target = position % size
            write = position < size  # keys past the end of the queue are dropped
            if accept is not None:
                write = write & accept
            self.bank.index_copy_(0, target, torch.where(write.unsqueeze(1), keys, self.bank[target]))
        else:  # a batch larger than the queue: row j takes key j - ptr
            source = torch.arange(size, device=keys.device) - ptr
            take = source >= 0
            if accept is not None:
                take = take & accept
            self.bank.copy_(torch.where(take.unsqueeze(1), keys[source.clamp(0, count - 1)], self.bank))
        self.bank_ptr.copy_(next_ptr)

    def follow(self, device: torch.device) -> None:
        """Move the bank to ``device`` if it lives elsewhere (docs/gpu.md: state follows the inputs)."""
        if self.bank.device != device:
            self.to(device)
