"""The teacher's targets: for every training window, the top-k next-token logprobs at each position, computed by
dist-infer's own engine (any layout, any executor: prompt logprobs, ``SamplingParams.prompt_logprobs``) and
cached on disk, so later epochs and later students never rerun the teacher.

For a window ``x_0 .. x_{T-1}`` the engine's prompt logprobs at position ``j >= 1`` are
``log p(. | x_{<j})``: the distribution the student predicts at position ``j - 1``. So the targets are
``top_ids, top_logprobs: [N, T - 1, k]`` (int32, float32), most likely first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dist_infer.distill.data import windows_fingerprint

REQUESTS_PER_CALL = 64  # windows handed to the engine at once: enough to batch, few enough to show progress


@dataclasses.dataclass
class TeacherTargets:
    top_ids: torch.Tensor  # [N, T - 1, k] int32
    top_logprobs: torch.Tensor  # [N, T - 1, k] float32
    seconds: float = 0.0  # teacher time when computed; 0 when read from the cache


def teacher_folder(engine_args) -> str:
    """The local folder the teacher's engine will load (a GGUF file or the default model converted first)."""
    return engine_args.create_engine_config().model_config.model


def cache_path(engine_args, folder: str, windows: torch.Tensor, top_k: int, cache_dir: str | None) -> Path:
    """Keyed by what changes the numbers: the teacher's files, dtype, quantization, KV-cache dtype, the windows
    and k; not by the layout, which must not change them."""
    from dist_infer.model_loader.cache_dir import cache_root

    folder = Path(folder).resolve()  # teacher_folder(engine_args), resolved once by the caller
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()
                   if p.suffix in (".safetensors", ".json", ".bin"))
    what = {"folder": str(folder), "files": files, "dtype": str(engine_args.dtype),
            "quantization": engine_args.quantization, "group": engine_args.quantization_group_size,
            "kv_cache_dtype": engine_args.kv_cache_dtype, "windows": windows_fingerprint(windows), "k": top_k}
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir else cache_root() / "teacher-targets"
    return root / f"{folder.name}-k{top_k}-{key}.safetensors"


def load_or_compute(engine_args, folder: str, windows: torch.Tensor, top_k: int, cache_dir: str | None = None,
                    show_progress: bool = True) -> tuple[TeacherTargets, Path]:
    path = cache_path(engine_args, folder, windows, top_k, cache_dir)
    if path.is_file():
        return read_targets(path), path
    targets = compute_targets(engine_args, windows, top_k, show_progress)
    write_targets(path, targets)
    return targets, path


def compute_targets(engine_args, windows: torch.Tensor, top_k: int, show_progress: bool = True) -> TeacherTargets:
    """Run the teacher's engine over ``windows`` ``[N, T]`` with ``prompt_logprobs=top_k``."""
    from dist_infer.entrypoints.llm import LLM
    from dist_infer.sampling_params import SamplingParams

    num, length = windows.shape
    args = dataclasses.replace(engine_args, skip_tokenizer_init=True)  # ids in, logprobs out: no text either way
    if args.max_model_len is not None and args.max_model_len < length + 1:
        raise ValueError(f"the teacher's max_model_len={args.max_model_len} is shorter than a window of "
                         f"{length} tokens plus one generated token")
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k)
    top_ids = torch.zeros(num, length - 1, top_k, dtype=torch.int32)
    top_logprobs = torch.zeros(num, length - 1, top_k, dtype=torch.float32)
    start = time.perf_counter()
    with LLM(**dataclasses.asdict(args)) as llm, \
            tqdm(total=num, desc="teacher", unit="window", disable=not show_progress) as bar:
        for first in range(0, num, REQUESTS_PER_CALL):
            rows = windows[first:first + REQUESTS_PER_CALL]
            outputs = llm.generate([{"prompt_token_ids": row.tolist()} for row in rows], params, use_tqdm=False)
            for i, output in enumerate(outputs):
                _fill(output.prompt_logprobs, top_k, top_ids[first + i], top_logprobs[first + i])
            bar.update(len(rows))
    return TeacherTargets(top_ids, top_logprobs, time.perf_counter() - start)


def _fill(entries, top_k: int, ids_out: torch.Tensor, logprobs_out: torch.Tensor) -> None:
    """``entries[j]`` (a dict token -> Logprob for prompt position j >= 1, which may add the prompt's own token
    beyond the top k) into row ``j - 1`` of the outputs, by rank."""
    for j in range(1, len(entries)):
        # the prompt's own token may tie a top-k entry's rank without being one of them: keep the first k
        top = sorted((lp.rank, token, lp.logprob) for token, lp in entries[j].items() if lp.rank <= top_k)[:top_k]
        if len(top) != top_k:
            raise RuntimeError(f"the teacher returned {len(top)} of the top {top_k} logprobs at position {j}")
        ids_out[j - 1] = torch.tensor([t for _, t, _ in top], dtype=torch.int32)
        logprobs_out[j - 1] = torch.tensor([v for _, _, v in top], dtype=torch.float32)


def write_targets(path: Path, targets: TeacherTargets) -> None:
    """Written to a temporary name and renamed: a reader (another rank, a later run) never sees half a file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"top_ids": targets.top_ids.contiguous(), "top_logprobs": targets.top_logprobs.contiguous()},
              str(tmp), metadata={"teacher_seconds": f"{targets.seconds:.3f}"})
    os.replace(tmp, path)


def read_targets(path: Path) -> TeacherTargets:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return TeacherTargets(tensors["top_ids"], tensors["top_logprobs"])


def wait_for(path: Path, poll_s: float = 1.0) -> TeacherTargets:
    """Other torchrun ranks wait while rank 0 runs the teacher (torchrun stops them all if rank 0 fails)."""
    while not path.is_file():
        time.sleep(poll_s)
    return read_targets(path)
