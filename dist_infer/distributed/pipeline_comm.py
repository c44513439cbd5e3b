"""Hands a stage's activations to the next pipeline stage: point-to-point, between workers, never inside model code.

Stage ``s`` sends ``(hidden, residual)`` for the step's T tokens, stacked as one [2, T, hidden] tensor, to
the rank of stage ``s+1`` with the same tensor-parallel rank; the receiver knows T from the scheduler output
it got. Sends are asynchronous, so a stage can start its next micro-batch while the last one is still on
the wire; a send is completed (and its buffer released) before the next one starts.
"""

from __future__ import annotations

import torch

from dist_infer.distributed.parallel_state import ParallelGroup


class PipelineComm:
    def __init__(self, pp_group: ParallelGroup, hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.group, self.hidden_size, self.dtype, self.device = pp_group, hidden_size, dtype, device
        self._pending = None  # (work, tensor) of the last send

    def send(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        import torch.distributed as dist

        self.wait()
        payload = torch.stack([hidden, residual]).contiguous()
        work = dist.isend(payload, dst=self.group.next_rank, group=self.group.device_group)
        self._pending = (work, payload)

    def recv(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch.distributed as dist

        payload = torch.empty(2, num_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
        dist.recv(payload, src=self.group.prev_rank, group=self.group.device_group)
        return payload[0], payload[1]

    def wait(self) -> None:
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
