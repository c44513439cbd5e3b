"""Batch files (resumable), a batch run as a Ray job on a head this test starts, a named handle reached from a
second driver, and data parallelism under load behind the server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import stop_ray_head
from prometheus_client.parser import text_string_to_metric_families

from server_helpers import ServerProcess

CLI = [sys.executable, "-m", "dist_infer.entrypoints.cli"]
LAUNCH = Path(__file__).resolve().parent.parent / "launch"


def _write_requests(path: Path, model: str, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            if i % 2:
                url, body = "/v1/completions", {"model": model, "prompt": f"Item {i}:", "max_tokens": 5, "temperature": 0}
            else:
                url, body = "/v1/chat/completions", {"model": model, "max_tokens": 5, "temperature": 0,
                                                     "messages": [{"role": "user", "content": f"Say {i}"}]}
            if i == 3:
                body["max_tokens"] = 0  # answered with an error line, not retried
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": url, "body": body}) + "\n")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_writes_every_result_and_resumes(tiny_llama_with_tokenizer, tmp_path):
    model = os.path.basename(tiny_llama_with_tokenizer)
    requests, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_requests(requests, model, 20)
    args = [*CLI, "batch", "-i", str(requests), "-o", str(out), "--model", tiny_llama_with_tokenizer,
            "--kv-cache-memory", str(1 << 22)]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    lines = _lines(out)
    assert sorted(l["custom_id"] for l in lines) == sorted(f"r{i}" for i in range(20))
    bad = next(l for l in lines if l["custom_id"] == "r3")
    assert bad["response"]["status_code"] == 400 and bad["error"]["message"]
    good = next(l for l in lines if l["custom_id"] == "r4")
    assert good["response"]["status_code"] == 200 and good["response"]["body"]["choices"][0]["message"]["content"]

    # An interruption: seven results on disk and a half-written eighth.
    raw = out.read_text().splitlines(keepends=True)
    out.write_text("".join(raw[:7]) + raw[7][: len(raw[7]) // 2])
    kept = [json.loads(line) for line in raw[:7]]
    second = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "answered 13 requests" in second.stdout
    lines = _lines(out)
    assert len(lines) == 20 and len({l["custom_id"] for l in lines}) == 20
    assert lines[:7] == kept  # finished work is neither lost nor redone


def test_resume_redoes_a_last_record_that_lost_its_newline(tmp_path):
    from dist_infer.entrypoints.batch import finished_ids

    out = tmp_path / "out.jsonl"
    records = [json.dumps({"custom_id": f"r{i}", "response": {"status_code": 200}}) for i in range(3)]
    # Interrupted between the third record and its newline: the line parses, but a resumed run appending to it
    # would glue the next record onto it (before the fix r2 counted as done and the file was kept as it was).
    out.write_text(records[0] + "\n" + records[1] + "\n" + records[2])
    assert finished_ids(str(out)) == {"r0", "r1"}
    assert out.read_text() == records[0] + "\n" + records[1] + "\n"
    # Complete lines are all kept.
    out.write_text("".join(r + "\n" for r in records))
    assert finished_ids(str(out)) == {"r0", "r1", "r2"} and out.read_text().count("\n") == 3


def test_bad_batch_file_is_refused_before_loading(tmp_path):
    path = tmp_path / "in.jsonl"
    line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "m"}})
    path.write_text(line + "\n" + line + "\n")
    # The model named does not exist: a check made only after loading would report the model instead.
    missing = tmp_path / "no-such-model"
    result = subprocess.run([*CLI, "batch", "-i", str(path), "-o", str(tmp_path / "o.jsonl"), "--model", str(missing)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "in.jsonl:2: custom_id 'a' appears twice" in result.stderr
    assert "no-such-model" not in result.stderr


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on this machine, its dashboard (job API) on 127.0.0.1, stopped afterwards."""
    import ray  # noqa: F401  (a required dependency: if it is broken the tests fail, they are not skipped)
    started = subprocess.run(["bash", str(LAUNCH / "ray_start_head.sh"), "--num-cpus", "4"], capture_output=True,
                             text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    yield "http://127.0.0.1:8265"
    stop_ray_head()


_SUBMIT = """
import sys, time
from ray.job_submission import JobStatus, JobSubmissionClient
client = JobSubmissionClient(sys.argv[1])
deadline = time.monotonic() + 120
while True:  # the head's job agent registers a moment after `ray start` returns; Ray says to try again
    try:
        job = client.submit_job(entrypoint=sys.argv[2])
        break
    except RuntimeError as e:
        if "No available agent" not in str(e) or time.monotonic() > deadline:
            raise
        time.sleep(1)
deadline = time.monotonic() + 300
while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
    if time.monotonic() > deadline:
        client.stop_job(job)
        sys.exit("the job did not finish in time")
    time.sleep(1)
status = client.get_job_status(job)
print(status)
if status != JobStatus.SUCCEEDED:
    sys.exit(client.get_job_logs(job)[-3000:])
"""


@pytest.mark.slow
def test_batch_as_a_ray_job(ray_head, tiny_llama_with_tokenizer, tmp_path):
    model = os.path.basename(tiny_llama_with_tokenizer)
    requests, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_requests(requests, model, 12)
    entrypoint = (f"dist-infer batch -i {requests} -o {out} --model {tiny_llama_with_tokenizer} --executor ray --pp 2 "
                  f"--kv-cache-memory {1 << 22}")
    # A fresh interpreter, with the token conftest.py set up (RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH) in its environment.
    submitted = subprocess.run([sys.executable, "-c", _SUBMIT, ray_head, entrypoint], capture_output=True, text=True,
                               timeout=400)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert "SUCCEEDED" in submitted.stdout
    lines = _lines(out)
    assert sorted(l["custom_id"] for l in lines) == sorted(f"r{i}" for i in range(12))


@pytest.mark.slow
def test_named_handle_from_a_second_driver(ray_head, tiny_llama_with_tokenizer):
    import ray

    from dist_infer import LLM, SamplingParams

    ray.init(address="auto", log_to_driver=False)
    try:
        llm = LLM(model=tiny_llama_with_tokenizer, name="dist-infer-test", kv_cache_memory=1 << 22)
        try:
            mine = llm.generate(["Hello there"], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].text
            code = ("import dist_infer\nfrom dist_infer import SamplingParams\n"
                    "h = dist_infer.get_handle('dist-infer-test')\n"
                    "p = SamplingParams(max_tokens=8, temperature=0)\n"
                    "print(repr(h.generate(['Hello there'], p)[0].outputs[0].text))\n"
                    "print(repr(''.join(h.stream('Hello there', p))))\n")
            other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                                   env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address})
            assert other.returncode == 0, other.stderr[-2000:]
            assert other.stdout.splitlines() == [repr(mine), repr(mine)]
        finally:
            llm.shutdown()
    finally:
        ray.shutdown()


def _replica_counters(server) -> dict:
    text = httpx.get(server.base_url + "/metrics", timeout=60).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("dist_infer_replica_requests_total", "dist_infer_replica_generation_tokens_total",
                          "dist_infer_prefix_cache_hit_tokens_total"):
                out[(s.name, s.labels["replica"])] = s.value
    return out


@pytest.mark.slow
def test_two_replicas_share_load_and_keep_prefixes_together(tiny_llama_with_tokenizer):
    model = os.path.basename(tiny_llama_with_tokenizer)
    server = ServerProcess("--model", tiny_llama_with_tokenizer, "--dp", "2", "--kv-cache-memory", str(1 << 22))
    try:
        async def load():
            async with httpx.AsyncClient(timeout=300) as client:
                bodies = [{"model": model, "prompt": f"Request number {i} says", "max_tokens": 16,
                           "temperature": 0} for i in range(40)]
                replies = await asyncio.gather(*(client.post(server.base_url + "/v1/completions", json=b)
                                                 for b in bodies))
                assert all(r.status_code == 200 for r in replies)

        asyncio.run(load())
        after_load = _replica_counters(server)
        for replica in ("0", "1"):
            assert after_load[("dist_infer_replica_generation_tokens_total", replica)] > 0, after_load

        prefix = "You are a careful assistant. " * 12  # many full blocks shared by every request below
        for i in range(6):
            reply = httpx.post(server.base_url + "/v1/completions", timeout=120,
                               json={"model": model, "prompt": prefix + f"Question {i}?", "max_tokens": 4})
            assert reply.status_code == 200
        final = _replica_counters(server)
        added = {r: final[("dist_infer_replica_requests_total", r)] - after_load[("dist_infer_replica_requests_total", r)]
                 for r in ("0", "1")}
        assert sorted(added.values()) == [0, 6], added  # all six on one replica
        home = max(added, key=added.get)
        hits = final[("dist_infer_prefix_cache_hit_tokens_total", home)] - \
            after_load[("dist_infer_prefix_cache_hit_tokens_total", home)]
        assert hits > 0
    finally:
        server.stop()


@pytest.mark.slow
def test_serve_named_engine_holds_max_waiting(ray_head, tiny_llama_with_tokenizer):
    """``serve --name``: the engine is a named Ray actor and the server admits against it. A burst of streams
    beyond ``--max-waiting`` gets 429s (admission counts each request before the next is looked at), and every
    admitted stream ends with [DONE]."""
    model = os.path.basename(tiny_llama_with_tokenizer)
    server = ServerProcess("--name", "dist-infer-serve-test", "--ray-address", "auto", "--model",
                           tiny_llama_with_tokenizer, "--max-waiting", "4", "--max-num-seqs", "2",
                           "--kv-cache-memory", str(1 << 22))
    try:
        async def one(client, i):
            body = {"model": model, "prompt": f"Stream {i}:", "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            async with client.stream("POST", server.base_url + "/v1/completions", json=body) as reply:
                text = "".join([chunk async for chunk in reply.aiter_text()])
                return reply.status_code, text

        async def burst():
            async with httpx.AsyncClient(timeout=300) as client:
                return await asyncio.gather(*(one(client, i) for i in range(30)))

        replies = asyncio.run(burst())
        codes = [code for code, _ in replies]
        assert set(codes) <= {200, 429} and codes.count(429) > 0 and codes.count(200) >= 4, codes
        assert all(text.rstrip().endswith("data: [DONE]") for code, text in replies if code == 200)
    finally:
        server.stop()
