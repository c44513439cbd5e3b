"""Starting a real ``dist-infer serve`` process for tests, on a free loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from dist_infer.distributed.utils import get_open_port


class ServerProcess:
    """The server's stdout and stderr go to a temporary file (a pipe nobody reads would fill up and stall a
    chatty server); ``output()`` reads what it has written so far."""

    def __init__(self, *args: str, env: dict | None = None, startup_timeout: float = 300.0):
        self.port = get_open_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "dist_infer.entrypoints.cli", "serve", "--port", str(self.port), *args]
        self._log = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not come up in time:\n{self.output()[-3000:]}")

    def output(self) -> str:
        """Everything the server printed and logged so far."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


class InProcessServer:
    """``build_app`` on a real engine (``engine_args``) served by uvicorn on a thread, with ``settings`` (a
    ``ServerSettings``); ``calls`` holds each (prompt, params) that reached the engine's ``generate``."""

    def __init__(self, settings, **engine_args):
        import threading

        import uvicorn

        from dist_infer import AsyncLLMEngine
        from dist_infer.entrypoints.openai.api_server import build_app
        from dist_infer.entrypoints.openai.http_server import uvicorn_config

        self.engine = AsyncLLMEngine.from_engine_args(**engine_args)
        self.calls: list[tuple] = []
        real = self.engine.generate

        def spy(prompt, params, request_id=None, priority=0, replica=None):
            self.calls.append((prompt, params))
            return real(prompt, params, request_id, priority, replica)

        self.engine.generate = spy
        port = get_open_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn_config(build_app(self.engine, settings), "127.0.0.1", port, "warning",
                                                    settings))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.shutdown()


def with_chat_template(model_dir: str, dest, template: str) -> str:
    """A copy of ``model_dir`` at ``dest`` whose chat template is ``template`` (Jinja text)."""
    import shutil

    shutil.copytree(model_dir, dest)
    (dest / "chat_template.jinja").write_text(template)
    return str(dest)


def worker_processes(server_pid: int) -> list:
    """The server's live worker processes: forked by the multiprocessing fork server (or, where there is none,
    spawned running the worker entry point); not the fork server, not the resource tracker, not zombies."""
    import psutil

    workers = []
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            parent = child.parent()
            forked = parent is not None and "multiprocessing.forkserver" in " ".join(parent.cmdline())
            if (forked or "spawn_main" in " ".join(child.cmdline())) and child.status() != psutil.STATUS_ZOMBIE:
                workers.append(child)
        except psutil.NoSuchProcess:
            pass
    return workers
