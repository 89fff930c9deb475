"""One vLLM-Omni server: where it is, the key it wants, and HTTP calls that Cancel can cut short.

`http.client` rather than a higher-level library: it is in every Python, and its socket can be
shut down from another thread, which is what makes Cancel stop waiting at once (closing the
connection also tells vLLM-Omni to drop the request; an image already on its GPU finishes).
"""
from __future__ import annotations

import http.client
import json
import math
import socket
import threading
from urllib.parse import urlsplit

from ..errors import NextStepError

API_KEY_ENV = "NEXTSTEP_SERVER_API_KEY"
# One image is one synchronous request: 512x512 at 20 steps took 230 s on two small GPUs
# (vLLM-Omni's own figure), and 1024x1024 has four times the tokens, so the default is generous.
DEFAULT_TIMEOUT = 1800.0
PROBE_TIMEOUT = 15.0    # /health, /v1/models and connecting: a server that is up answers these at once
START_HINT = "vllm serve stepfun-ai/NextStep-1.1 --omni --port 8091"


class ServerError(NextStepError):
    """A server cannot be reached, is not the right one, or refused or failed a request."""


class Aborted(Exception):
    """The call was cut short by `Server.abort()` (Cancel, or another server failing the run)."""


def parse_servers(servers) -> list[str]:
    """Base URLs from a list, or from one text of URLs separated by new lines, commas or spaces
    (the node's widget). A trailing `/v1` (an OpenAI client's base URL) is accepted and dropped."""
    items = servers.replace(",", " ").split() if isinstance(servers, str) else [str(s).strip() for s in servers]
    urls = []
    for item in items:
        url = item.rstrip("/")
        if url.endswith("/v1"):
            url = url[:-3]
        parts = urlsplit(url)
        try:
            parts.port
        except ValueError:
            raise ServerError(f"Server URL {item!r} has an invalid port; write it like http://host:8091.") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ServerError(f"Server URL {item!r} is not a server's base URL; write it like http://host:8091 "
                              "(http or https, host and port, nothing after the port).")
        if url in urls:
            raise ServerError(f"Server {url} is listed twice; list each server once (each draws its share of the "
                              "images, one at a time).")
        urls.append(url)
    if not urls:
        raise ServerError(f"No server given: add the base URL of a vLLM-Omni server (http://host:8091), "
                          f"started with: {START_HINT}")
    return urls


def describe_detail(payload, text: str) -> str:
    """The reason a FastAPI/vLLM error answer gives: `detail` (a text, or 422's list of field
    errors), or vLLM's `error.message`."""
    if isinstance(payload, dict):
        detail = payload.get("detail")
        if isinstance(detail, list):
            return "; ".join(f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg', d)}"
                             if isinstance(d, dict) else str(d) for d in detail)
        if detail:
            return str(detail)
        error = payload.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if payload.get("message"):
            return str(payload["message"])
    text = text.strip()
    return text[:300] if text else "no reason given"


class Server:
    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT, key: str | None = None):
        """`key`: the API key, given only once trust.key_for has cleared this server for it."""
        if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:  # NaN passes `<= 0`
            raise ServerError(f"Server timeout {timeout} s must be a positive finite number of seconds (the default "
                              f"is {DEFAULT_TIMEOUT:.0f} s).")
        parts = urlsplit(url)
        self.url, self.timeout = url, float(timeout)
        self._https, self._host, self._port = parts.scheme == "https", parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self._key = key
        self._lock = threading.Lock()
        self._conn = None
        self._aborted = False

    def __repr__(self) -> str:  # never the key
        return f"<vLLM-Omni server {self.url}>"

    def _headers(self, body: bool) -> dict:
        headers = {"Accept": "application/json"}
        if body:
            headers["Content-Type"] = "application/json"
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        return headers

    def call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None):
        """-> (status, parsed JSON or None, text). Raises ServerError when no answer comes,
        Aborted after abort()."""
        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        with self._lock:
            if self._aborted:
                raise Aborted()
            conn = self._conn = kind(self._host, self._port, timeout=PROBE_TIMEOUT)
        wait = timeout or self.timeout
        try:
            conn.connect()
            with self._lock:
                if self._aborted:
                    raise Aborted()
            conn.sock.settimeout(wait)
            data = None if body is None else json.dumps(body).encode("utf-8")
            conn.request(method, self._prefix + path, body=data, headers=self._headers(body is not None))
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            if self._aborted:
                raise Aborted() from None
            raise ServerError(self._no_answer(method, path, exc, wait)) from None
        finally:
            with self._lock:
                self._conn = None
            conn.close()
        text = raw.decode("utf-8", "replace")
        try:
            payload = json.loads(text) if text else None
        except ValueError:
            payload = None
        return resp.status, payload, text

    def _no_answer(self, method: str, path: str, exc: Exception, wait: float) -> str:
        where = f"{method} {self.url}{path}"
        if isinstance(exc, socket.timeout):
            return (f"{where} got no answer within {wait:g} s. A big image on small GPUs can take longer: raise "
                    "the server timeout; or check that the server is still running.")
        if isinstance(exc, ConnectionRefusedError):
            return (f"Cannot reach {self.url}: nothing listens there. Is vLLM-Omni running on that host and port? "
                    f"Start it with: {START_HINT}")
        if isinstance(exc, socket.gaierror):
            return f"Cannot reach {self.url}: the host name {self._host!r} is unknown. Check the URL."
        if isinstance(exc, (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError)):
            return (f"{where}: the server closed the connection without answering ({type(exc).__name__}); it may "
                    "have stopped or restarted. Look at its log.")
        return f"{where} failed: {type(exc).__name__}: {exc}"

    def abort(self) -> None:
        """Stop the call in flight (from another thread) and refuse new ones."""
        with self._lock:
            self._aborted = True
            sock = self._conn.sock if self._conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def refused(self, status: int, payload, text: str, what: str) -> ServerError:
        detail = describe_detail(payload, text)
        if status == 401:
            fix = (f"the key in {API_KEY_ENV} is not the server's --api-key" if self._key
                   else f"it was started with --api-key: set the environment variable {API_KEY_ENV} to that key")
            return ServerError(f"{self.url} refused {what} (401 {detail}): {fix}.")
        return ServerError(f"{self.url} answered {what} with {status}: {detail}")

    def probe(self, model: str | None = None) -> str:
        """GET /health and /v1/models -> the served model id, checked against `model` (or, when
        none is given, checked to be NextStep-1.1)."""
        status, payload, text = self.call("GET", "/health", timeout=PROBE_TIMEOUT)
        if status == 404:
            raise ServerError(f"{self.url} has no /health route, so it is not a vLLM server (wrong port?). "
                              f"Start vLLM-Omni with: {START_HINT}")
        if status != 200:
            raise ServerError(f"{self.url} is up but not ready: /health answered {status} "
                              f"({describe_detail(payload, text)}). Wait until its log says the application "
                              f"started, or restart it: {START_HINT}")
        status, payload, text = self.call("GET", "/v1/models", timeout=PROBE_TIMEOUT)
        if status != 200:
            raise self.refused(status, payload, text, "GET /v1/models")
        cards = [c for c in (payload or {}).get("data", []) if isinstance(c, dict) and c.get("id")]
        ids = [str(c["id"]) for c in cards]
        if not ids:
            raise ServerError(f"{self.url} serves no model (/v1/models is empty). Start it with: {START_HINT}")
        if model:
            if model in ids:
                return model
            raise ServerError(f"{self.url} serves {', '.join(ids)}, not {model!r}. Point at the server that serves "
                              f"{model!r}, or check the model name (the server's --served-model-name).")
        for card in cards:
            if is_nextstep11(str(card["id"])) or is_nextstep11(str(card.get("root") or "")):
                return str(card["id"])
        raise ServerError(f"{self.url} serves {', '.join(ids)}, which is not NextStep-1.1; vLLM-Omni draws "
                          f"NextStep-1.1 text-to-image. Start it with: {START_HINT}. If that is NextStep-1.1 under "
                          "another name, give the name as the model to check against.")


def is_nextstep11(name: str) -> bool:
    """stepfun-ai/NextStep-1.1, a local folder NextStep-1.1-Pretrain, nextstep_1_1 ..."""
    n = name.lower().replace("_", "-")
    return "nextstep" in n.replace("-", "") and ("1.1" in n or "1-1" in n)


def is_pretrain(name: str) -> bool:
    return "pretrain" in name.lower()
