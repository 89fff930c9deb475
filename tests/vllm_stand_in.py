"""A stand-in vLLM-Omni server for the tests: the standard library's HTTP server on 127.0.0.1, on
a free port, serving the routes the pack uses (`GET /health`, `GET /v1/models`,
`POST /v1/images/generations`) with the field limits of vLLM-Omni 0.30's ImageGenerationRequest.

Each answer is a PNG derived from the request's fields (prompt, seed, size, settings), so equal
requests give equal images and any change of field changes the picture. It records every body
and header it got, can be told to fail, to want an API key, or to take a while per image (and
notes when a client hangs up while it waits).
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import select
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

NEXTSTEP = "stepfun-ai/NextStep-1.1"


def picture(body: dict) -> Image.Image:
    """A deterministic image for a request: its fields hashed into the pixels."""
    w, h = (int(v) for v in body["size"].split("x"))
    digest = hashlib.sha256(json.dumps({k: v for k, v in body.items() if k != "model"}, sort_keys=True).encode())
    rng = np.random.default_rng(int.from_bytes(digest.digest()[:8], "little"))
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def problems(body) -> list:
    """422 field errors, as FastAPI reports them for ImageGenerationRequest."""
    if not isinstance(body, dict):
        return [{"loc": ["body"], "msg": "Input should be a valid dictionary", "type": "dict_type"}]
    out = []

    def bad(field, msg):
        out.append({"loc": ["body", field], "msg": msg, "type": "value_error"})

    if not isinstance(body.get("prompt"), str):
        bad("prompt", "Field required")
    if not isinstance(body.get("n", 1), int) or not 1 <= body.get("n", 1) <= 10:
        bad("n", "Input should be between 1 and 10")
    size = body.get("size")
    if size is not None and (not isinstance(size, str) or "x" not in size):
        bad("size", "size must be in format 'WIDTHxHEIGHT' (e.g., '1024x1024')")
    steps = body.get("num_inference_steps")
    if steps is not None and (not isinstance(steps, int) or not 1 <= steps <= 200):
        bad("num_inference_steps", "Input should be between 1 and 200")
    cfg = body.get("guidance_scale")
    if cfg is not None and (not isinstance(cfg, (int, float)) or not 0 <= cfg <= 20):
        bad("guidance_scale", "Input should be between 0 and 20")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or not -2 ** 63 <= seed < 2 ** 63):
        bad("seed", "Input should be a valid int64")
    if body.get("response_format", "b64_json") not in ("b64_json", "file"):
        bad("response_format", "Only 'b64_json' or 'file' response format is supported")
    if body.get("extra_params") is not None and not isinstance(body["extra_params"], dict):
        bad("extra_params", "Input should be a valid dictionary")
    return out


class StandIn:
    def __init__(self, model: str = NEXTSTEP, root: str | None = None, api_key: str | None = None,
                 delay: float = 0.0, health: int = 200, fail_at: int | None = None, bad_image: bool = False):
        self.model, self.root, self.api_key = model, root or model, api_key
        self.delay, self.health, self.fail_at, self.bad_image = delay, health, fail_at, bad_image
        self.bodies: list = []        # JSON bodies of image requests, in arrival order
        self.headers: list = []       # headers of every request
        self.paths: list = []         # (method, path) of every request
        self.hung_up = 0              # image requests whose client closed the connection while it waited
        self.spans: list = []         # (start, end) monotonic times of each answered image request
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "StandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def _handler(self):
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def reply(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def record(self, method: str) -> bool:
                with stand_in.lock:
                    stand_in.paths.append((method, self.path))
                    stand_in.headers.append(dict(self.headers))
                if stand_in.api_key and self.path.startswith("/v1"):
                    if self.headers.get("Authorization") != f"Bearer {stand_in.api_key}":
                        self.reply(401, {"error": "Unauthorized"})
                        return False
                return True

            def do_GET(self):
                if not self.record("GET"):
                    return
                if self.path == "/health":
                    self.reply(stand_in.health, {"status": "healthy"} if stand_in.health == 200 else
                               {"status": "unhealthy", "reason": "No engine initialized"})
                elif self.path == "/v1/models":
                    self.reply(200, {"object": "list", "data": [
                        {"id": stand_in.model, "object": "model", "root": stand_in.root, "owned_by": "vllm-omni"}]})
                else:
                    self.reply(404, {"detail": "Not Found"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if not self.record("POST"):
                    return
                if self.path != "/v1/images/generations":
                    self.reply(404, {"detail": "Not Found"})
                    return
                try:
                    body = json.loads(raw)
                except ValueError:
                    self.reply(400, {"detail": "invalid JSON"})
                    return
                with stand_in.lock:
                    stand_in.bodies.append(body)
                    number = len(stand_in.bodies)
                errors = problems(body)
                if errors:
                    self.reply(422, {"detail": errors})
                    return
                if body.get("model") is not None and body["model"] != stand_in.model:
                    self.reply(400, {"detail": f"Model mismatch: request specifies '{body['model']}' but server "
                                               f"is running '{stand_in.model}'."})
                    return
                started = time.monotonic()
                if stand_in.delay and not self.wait(stand_in.delay):
                    return
                if stand_in.fail_at is not None and number >= stand_in.fail_at:
                    self.reply(500, {"detail": "Image generation failed: CUDA out of memory"})
                    return
                images = [picture(body) for _ in range(body.get("n", 1))]
                data = [{"b64_json": "not base64!" if stand_in.bad_image else png_b64(im), "revised_prompt": None}
                        for im in images]
                with stand_in.lock:
                    stand_in.spans.append((started, time.monotonic()))
                self.reply(200, {"created": int(time.time()), "data": data, "output_format": "png",
                                 "size": body["size"], "metrics": {}})

            def wait(self, seconds: float) -> bool:
                """Sleep like a GPU would; False when the client hung up or the stand-in stops."""
                end = time.monotonic() + seconds
                while time.monotonic() < end and not stand_in.stopping.is_set():
                    readable, _, _ = select.select([self.connection], [], [], 0.05)
                    if readable and not self.connection.recv(1, socket.MSG_PEEK):  # MSG_PEEK: b'' = closed
                        with stand_in.lock:
                            stand_in.hung_up += 1
                        return False
                return not stand_in.stopping.is_set()

        return Handler


@contextmanager
def stand_ins(count: int, **kwargs):
    """`count` stand-in servers, stopped on exit."""
    servers = [StandIn(**kwargs) for _ in range(count)]
    try:
        for s in servers:
            s.__enter__()
        yield servers
    finally:
        for s in servers:
            s.__exit__(None, None, None)
