"""Shared fixtures: tiny random checkpoints written with ``save_pretrained``, and the embedded default model."""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Every Ray head the tests start (in-process, by launch script, in a namespace) uses token authentication with
# a token in a temporary file, never the user's ~/.ray; and no test joins a cluster the environment names.
_RAY_TOKEN_DIR = tempfile.mkdtemp(prefix="dist-infer-test-ray-")
atexit.register(shutil.rmtree, _RAY_TOKEN_DIR, True)
with open(os.path.join(_RAY_TOKEN_DIR, "auth_token"), "w") as _f:
    _f.write(secrets.token_hex(32))
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=os.path.join(_RAY_TOKEN_DIR, "auth_token"))
for _name in ("RAY_AUTH_TOKEN", "RAY_ADDRESS"):
    os.environ.pop(_name, None)


def save_tiny_model(config, path, seed: int = 0, bias_std: float = 0.0, tokenizer_dir: str | None = None,
                    norm_std: float = 0.0, **save_kwargs) -> str:
    """Random weights for ``config`` (large init so greedy choices are not near-ties), saved as a HF folder.
    ``bias_std`` / ``norm_std`` draw the biases / add noise to the norm weights (which start constant)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if bias_std and name.endswith("bias"):
                p.normal_(0.0, bias_std)
            if norm_std and name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * norm_std)
    model.save_pretrained(str(path), **save_kwargs)
    if tokenizer_dir is not None:
        for name in os.listdir(tokenizer_dir):
            if name.startswith("tokenizer") or name.endswith(".jinja") or name == "special_tokens_map.json":
                shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(str(path), name))
    return str(path)


def no_special_tokens() -> dict:
    return dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def tiny_llama_config(**overrides):
    """A small random Llama with GQA and no special tokens; keyword arguments override any field."""
    from transformers import LlamaConfig

    fields = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, **no_special_tokens())
    fields.update(overrides)
    return LlamaConfig(**fields)


@pytest.fixture(scope="session")
def default_model_path() -> str:
    """The embedded SmolLM2-135M-Instruct, converted once into the cache."""
    from dist_infer.model_loader.resolve import resolve_model_path

    return resolve_model_path(None)


@pytest.fixture(scope="session")
def tiny_llama_with_tokenizer(tmp_path_factory, default_model_path) -> str:
    """A tiny random Llama that speaks SmolLM2's tokenizer (vocab 49152), for text-level tests."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.5, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    return save_tiny_model(config, tmp_path_factory.mktemp("tiny_tok"), tokenizer_dir=default_model_path)


@pytest.fixture(scope="module")
def ray_session():
    """A private Ray instance shared by one test module's Ray cases (8 CPU slots, whatever the machine has)."""
    import ray  # a required dependency: if it is broken the tests fail, they are not skipped
    from dist_infer.executor.ray_cluster import start_private

    start_private(num_cpus=8)
    yield ray
    ray.shutdown()


# Modules that start a Ray head on the machine's address (port 6379, dashboard 8265) or look at every Ray process
# on it run one after another on one xdist worker; private Ray instances (loopback, random ports) run anywhere.
_RAY_HEAD_MODULES = {"test_batch_and_ray_jobs", "test_launch_scripts", "test_ray_private", "test_ray_multinode",
                     "test_two_hosts"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Groups the tests for ``--dist loadgroup``: a module's tests stay together on one worker (so its
    module-scoped engines and servers are shared as written), and the Ray-head modules share one group."""
    for item in items:
        stem = item.path.stem
        item.add_marker(pytest.mark.xdist_group("ray-head" if stem in _RAY_HEAD_MODULES else stem))


def stop_ray_head(port: int = 6379) -> None:
    """Ends the Ray cluster a launch script started on ``port`` and nothing else (``ray stop`` would end every Ray
    instance on the machine, another test's private one included): its processes name the head's GCS port. Their
    children go too: the raylet's dashboard and runtime-env agents rename themselves (``ray::DashboardAgent``), and
    one that outlives its head holds the agent port, so the next head's job agent never registers ("No available
    agent to submit job")."""
    import psutil

    procs = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            args = proc.info["cmdline"] or []
            if proc.pid != os.getpid() and any(a.endswith((f":{port}", f"={port}")) for a in args):
                procs.update((p.pid, p) for p in [proc, *proc.children(recursive=True)])
        except psutil.Error:
            continue
    procs.pop(os.getpid(), None)
    procs = list(procs.values())
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=30)
