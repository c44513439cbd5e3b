"""The step's grammar mask, filled on a background thread while the model runs.

On the sampling rank (last pipeline stage, tensor-parallel rank 0), ``start`` is called at the beginning of a
step with the requests sampled in it, before the forward: a single worker thread syncs each constrained
request's matcher with its output (``RequestGrammar.sync``: it consumes the token sampled last step) and fills
its row of an int32 bitmask [B, ceil(V / 32)] with xgrammar's ``fill_next_token_bitmask`` (C++; it releases the
GIL, so the fill runs beside the forward). ``PendingMask.result`` joins the thread after the logits are
computed and moves the bitmask to the logits' device; the sampler applies it to the constrained rows
(``SamplingBatch.grammar_bitmask``, ``structured_output.apply``: disallowed logits become -inf, with the other
constraints, before penalties, temperature and top-k/p). Rows without a grammar are left alone.

``last_timing`` keeps what the latest step spent: ``fill_s`` (the background work), ``wait_s`` (how long
``result`` blocked: the part of the fill the forward did not hide) and ``copy_s`` (the bitmask to the device).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from dist_infer.structured_output.compiler import GrammarCompiler
from dist_infer.structured_output.request_grammar import RequestGrammar
from dist_infer.structured_output.spec import spec_of

_BITS = torch.arange(32, dtype=torch.int32)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [B, W] (bit j of word w: token 32 w + j allowed) -> bool [B, vocab_size] (to inspect a mask; the
    sampler applies the packed words directly)."""
    bits = (bitmask.unsqueeze(-1) >> _BITS.to(bitmask.device)) & 1  # arithmetic shift: & 1 keeps bit j alone
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


class PendingMask:
    def __init__(self, future: Future, bitmask: torch.Tensor, rows: list[int], owner: StructuredOutputs):
        self._future, self._bitmask, self.rows, self._owner = future, bitmask, rows, owner

    def result(self, device: torch.device) -> tuple[torch.Tensor, list[int]]:
        """Joins the fill; (the int32 bitmask [B, ceil(V / 32)] on ``device``, the constrained rows)."""
        start = time.perf_counter()
        fill_s = self._future.result()
        waited = time.perf_counter()
        bitmask = self._bitmask.to(device, non_blocking=True)
        self._owner.last_timing = dict(fill_s=fill_s, wait_s=waited - start, copy_s=time.perf_counter() - waited)
        return bitmask, self.rows


class StructuredOutputs:
    """The sampling rank's grammar side. ``load_tokenizer`` returns (tokenizer, stop token ids); it is called
    once, on the first constrained request (a worker in another process loads the tokenizer from the model
    folder itself)."""

    def __init__(self, load_tokenizer, vocab_size: int):
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self.compiler: GrammarCompiler | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.last_timing: dict[str, float] = {}
        self.fills_started = 0  # steps whose fill was started (tests check it starts before the forward)

    @staticmethod
    def wanted(states) -> bool:
        return any(s.sampling_params.structured_outputs is not None for s in states)

    def start(self, states) -> PendingMask:
        """Starts filling the mask of ``states`` (the step's sampled requests, row order) in the background.
        ``states``' ``grammar`` attributes belong to the fill until ``result`` returns."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        width = (self.vocab_size + 31) // 32
        bitmask = torch.full((len(states), width), -1, dtype=torch.int32)
        self.fills_started += 1
        future = self._pool.submit(self._fill, list(states), bitmask)
        rows = [i for i, s in enumerate(states) if s.sampling_params.structured_outputs is not None]
        return PendingMask(future, bitmask, rows, self)

    @torch.inference_mode()  # the bitmask was made in the step's inference mode, which is per thread
    def _fill(self, states, bitmask: torch.Tensor) -> float:
        start = time.perf_counter()
        for row, state in enumerate(states):
            params = state.sampling_params.structured_outputs
            if params is None:
                continue
            if state.grammar is None:
                compiler = self._compiler()
                state.grammar = RequestGrammar(compiler.compile(spec_of(params)), compiler.stop_token_ids,
                                               state.req_id)
            state.grammar.sync(state.token_ids, state.num_prompt_tokens)
            state.grammar.fill(bitmask, row)
        return time.perf_counter() - start

    def _compiler(self) -> GrammarCompiler:
        with self._lock:
            if self.compiler is None:
                tokenizer, stop_ids = self._load_tokenizer()
                if tokenizer is None:
                    raise ValueError("structured outputs need the model's tokenizer (skip_tokenizer_init is set)")
                self.compiler = GrammarCompiler(tokenizer, self.vocab_size, stop_ids)
            return self.compiler

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
