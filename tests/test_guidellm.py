"""guidellm, the benchmark tool vLLM users run against any OpenAI-compatible server, against ``dist-infer
serve``: its ``openai_http`` backend streams chat completions with vLLM's
``stream_options.continuous_usage_stats`` and ``ignore_eos`` (a 400 on every request before issue 13), and
reads the token counts from the server's usage. Nothing leaves 127.0.0.1: the tokenizer guidellm uses to build
its synthetic prompts is the tiny test model's folder, and the hub is off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from server_helpers import ServerProcess

KEY = "sk-guidellm-test"
REQUESTS, STREAMS, PROMPT_TOKENS, OUTPUT_TOKENS = 12, 4, 32, 16
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def server(tiny_llama_with_tokenizer):
    server = ServerProcess("--model", tiny_llama_with_tokenizer, "--kv-cache-memory", str(1 << 22),
                           env={"DIST_INFER_API_KEY": KEY})
    yield server
    server.stop()


@pytest.mark.slow
def test_guidellm_concurrent_benchmark_succeeds(server, tiny_llama_with_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "benchmarks.json"
    cmd = [sys.executable, "-m", "guidellm", "run",  # a test dependency (pyproject's test extra)
           "--backend", f"kind=openai_http,target={server.base_url},api_key={KEY}",
           "--profile", f"kind=concurrent,streams={STREAMS}",
           "--constraint", f"kind=max_requests,count={REQUESTS}",
           "--tokenizer", f"kind=huggingface_auto,model={tiny_llama_with_tokenizer}",
           "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}",
           "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    run = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, **OFFLINE}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:], server.output()[-3000:])

    (benchmark,) = json.loads(out.read_text())["benchmarks"]
    totals = benchmark["metrics"]["request_totals"]
    assert totals == {"successful": REQUESTS, "errored": 0, "incomplete": 0, "total": REQUESTS}, \
        (totals, server.output()[-3000:])
    assert benchmark["config"]["strategy"]["type_"] == "concurrent"

    # Each request's token counts came from the server's usage: the output as asked (ignore_eos honoured), the
    # prompt as Hugging Face's chat template and tokenizer count the messages guidellm sent.
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_with_tokenizer)
    for request in benchmark["requests"]["successful"]:
        body = json.loads(request["request_args"])["body"]
        assert body["stream_options"]["continuous_usage_stats"] is True and body["ignore_eos"] is True
        messages = [{"role": m["role"], "content": "".join(p["text"] for p in m["content"])}
                    if isinstance(m["content"], list) else m for m in body["messages"]]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert request["prompt_tokens"] == len(tokenizer.encode(text, add_special_tokens=False))
        assert request["output_tokens"] == OUTPUT_TOKENS

