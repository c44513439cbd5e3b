"""Python clients for a running ``dist-infer serve``: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

    from dist_infer import Client
    with Client("http://127.0.0.1:8000", api_key="sk-local") as client:
        print(client.chat([{"role": "user", "content": "Hi"}], max_tokens=20)["choices"][0]["message"]["content"])
        for piece in client.stream_chat([{"role": "user", "content": "Tell me a story"}]):
            print(piece, end="")

Responses are the server's OpenAI-shaped JSON; streams yield text pieces. An error answer raises
``ClientError`` carrying the HTTP status and the server's error body. ``model`` defaults to the one the
server serves.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import httpx


class ClientError(RuntimeError):
    def __init__(self, status: int, body: dict | str):
        self.status, self.body = status, body
        super().__init__(f"HTTP {status}: {_message(body)}")


def _message(body: dict | str) -> str:
    """The error message of an OpenAI-shaped body, else of a FastAPI one (``detail``), else the raw text."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
        if body.get("detail"):
            return str(body["detail"])
        return json.dumps(body)[:500]
    return (body or "(empty body)")[:500]


def _raise_for(response: httpx.Response, body: bytes | None = None) -> None:
    if response.status_code < 400:
        return
    raw = body if body is not None else response.content
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = raw.decode(errors="replace")
    raise ClientError(response.status_code, payload)


def _pieces(lines, kind: str) -> Iterator[str]:
    """Text pieces out of SSE ``data:`` lines; an in-stream error raises."""
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            raise ClientError(500, event)
        for choice in event.get("choices", []):
            piece = choice.get("text") if kind == "completion" else choice.get("delta", {}).get("content")
            if piece:
                yield piece


class _Base:
    def __init__(self, base_url: str, api_key: str | None):
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._model: str | None = None

    @staticmethod
    def _body(model: str, params: dict, **fields) -> dict:
        return {"model": model, **fields, **params}


class Client(_Base):
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 600.0):
        super().__init__(base_url, api_key)
        self._http = httpx.Client(headers=self.headers, timeout=timeout)

    def models(self) -> list[str]:
        response = self._http.get(f"{self.base_url}/v1/models")
        _raise_for(response)
        return [m["id"] for m in response.json()["data"]]

    def _model_name(self, model: str | None) -> str:
        if model is None:
            self._model = self._model or self.models()[0]
            return self._model
        return model

    def _post(self, path: str, body: dict) -> dict:
        response = self._http.post(f"{self.base_url}{path}", json=body)
        _raise_for(response)
        return response.json()

    def _stream(self, path: str, body: dict, kind: str) -> Iterator[str]:
        with self._http.stream("POST", f"{self.base_url}{path}", json={**body, "stream": True}) as response:
            if response.status_code >= 400:
                _raise_for(response, response.read())
            yield from _pieces(response.iter_lines(), kind)

    def complete(self, prompt, model: str | None = None, **params) -> dict:
        return self._post("/v1/completions", self._body(self._model_name(model), params, prompt=prompt))

    def chat(self, messages: list[dict], model: str | None = None, **params) -> dict:
        return self._post("/v1/chat/completions", self._body(self._model_name(model), params, messages=messages))

    def stream_complete(self, prompt, model: str | None = None, **params) -> Iterator[str]:
        return self._stream("/v1/completions", self._body(self._model_name(model), params, prompt=prompt), "completion")

    def stream_chat(self, messages: list[dict], model: str | None = None, **params) -> Iterator[str]:
        body = self._body(self._model_name(model), params, messages=messages)
        return self._stream("/v1/chat/completions", body, "chat")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 600.0):
        super().__init__(base_url, api_key)
        self._http = httpx.AsyncClient(headers=self.headers, timeout=timeout)

    async def models(self) -> list[str]:
        response = await self._http.get(f"{self.base_url}/v1/models")
        _raise_for(response)
        return [m["id"] for m in response.json()["data"]]

    async def _model_name(self, model: str | None) -> str:
        if model is None:
            self._model = self._model or (await self.models())[0]
            return self._model
        return model

    async def _post(self, path: str, body: dict) -> dict:
        response = await self._http.post(f"{self.base_url}{path}", json=body)
        _raise_for(response)
        return response.json()

    async def _stream(self, path: str, body: dict, kind: str) -> AsyncIterator[str]:
        async with self._http.stream("POST", f"{self.base_url}{path}", json={**body, "stream": True}) as response:
            if response.status_code >= 400:
                _raise_for(response, await response.aread())
            async for line in response.aiter_lines():
                for piece in _pieces([line], kind):
                    yield piece
                if line == "data: [DONE]":
                    return

    async def complete(self, prompt, model: str | None = None, **params) -> dict:
        return await self._post("/v1/completions", self._body(await self._model_name(model), params, prompt=prompt))

    async def chat(self, messages: list[dict], model: str | None = None, **params) -> dict:
        body = self._body(await self._model_name(model), params, messages=messages)
        return await self._post("/v1/chat/completions", body)

    async def stream_complete(self, prompt, model: str | None = None, **params) -> AsyncIterator[str]:
        body = self._body(await self._model_name(model), params, prompt=prompt)
        async for piece in self._stream("/v1/completions", body, "completion"):
            yield piece

    async def stream_chat(self, messages: list[dict], model: str | None = None, **params) -> AsyncIterator[str]:
        body = self._body(await self._model_name(model), params, messages=messages)
        async for piece in self._stream("/v1/chat/completions", body, "chat"):
            yield piece

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
