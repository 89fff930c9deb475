"""One run spread over several servers: checks first, then one request per image, in parallel.

Image i goes to server i mod k and is drawn with seed + i, so the same seed and settings give
the same images whatever the number of servers, and which server drew which image is fixed
(servers with different GPU layouts are not bit-equal to each other). A failing server fails
the whole run with its name: no retry elsewhere, no partial result.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .payload import check_request, decode_image, image_jobs, request_body
from .servers import DEFAULT_TIMEOUT, Aborted, Server, ServerError, is_pretrain, parse_servers
from .trust import key_for

POLL_S = 0.1      # how often Cancel is looked at while waiting
TICK_S = 1.0      # how often progress is reported when nothing finishes (the elapsed time moves)
JOIN_S = 2.0      # how long a cancelled run waits for its request threads to let go


@dataclass
class Progress:
    servers: list
    done: list
    total: list
    elapsed: float

    def describe(self) -> str:
        head = f"{sum(self.done)}/{sum(self.total)} images, {self.elapsed:.0f} s"
        if len(self.servers) == 1:
            return f"{head} ({self.servers[0]})"
        return head + "; " + ", ".join(f"{u}: {d}/{t}" for u, d, t in zip(self.servers, self.done, self.total))


@dataclass
class RemoteResult:
    images: torch.Tensor                 # [B, H, W, 3] float32 0..1, in the order of a local batch
    drawn_by: list = field(default_factory=list)   # the server URL of each image
    seeds: list = field(default_factory=list)
    model: str = ""


def check_servers(servers: list, model: Optional[str], check: Optional[Callable[[], None]] = None) -> list:
    """Every server up and serving the same NextStep-1.1 -> the served id of each. The servers are
    asked in parallel, and Cancel is looked at while they answer."""
    events: queue.Queue = queue.Queue()

    def probe(k: int, server: Server) -> None:
        try:
            events.put((k, server.probe(model), None))
        except Aborted:
            pass
        except Exception as exc:
            events.put((k, None, exc if isinstance(exc, ServerError) else
                        ServerError(f"{server.url}: {type(exc).__name__}: {exc}")))

    for k, server in enumerate(servers):
        threading.Thread(target=probe, args=(k, server), daemon=True, name=f"nextstep-probe-{k}").start()
    served = [None] * len(servers)
    for _ in servers:
        while True:
            try:
                k, name, error = events.get(timeout=POLL_S)
                break
            except queue.Empty:
                if check is not None:
                    check()
        if error is not None:
            raise error
        served[k] = name
    if len({is_pretrain(m) for m in served}) > 1:
        listed = ", ".join(f"{s.url} serves {m}" for s, m in zip(servers, served))
        raise ServerError(f"The servers serve different models ({listed}); images would depend on which server "
                          "drew them. List servers of one model.")
    return served


def _worker(server: Server, model: str, req, jobs: list, events: queue.Queue) -> None:
    try:
        for index, prompt, seed in jobs:
            status, payload, text = server.call("POST", "/v1/images/generations",
                                                request_body(req, prompt, seed, model))
            if status != 200:
                raise server.refused(status, payload, text, f"image {index} (seed {seed})")
            events.put(("image", server, index, decode_image(payload, server.url, req.width, req.height)))
    except Aborted:
        pass
    except ServerError as exc:
        events.put(("error", server, None, exc))
    except Exception as exc:  # a fault in this client: still name the server it happened with
        events.put(("error", server, None, ServerError(f"{server.url}: {type(exc).__name__}: {exc}")))


def draw(servers, req, *, model: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT,
         on_progress: Optional[Callable[[Progress], None]] = None,
         check: Optional[Callable[[], None]] = None, typed: tuple = ()) -> RemoteResult:
    """`check()` is called every POLL_S while waiting and may raise to cancel (ComfyUI's interrupt);
    so may Ctrl-C. Either way nothing more is sent, requests in flight are closed, and it re-raises.
    `typed`: servers the user typed for this run (the CLI's --server), trusted with the API key;
    servers from anywhere else get it only when NEXTSTEP_SERVER_HOSTS lists them (trust.py)."""
    count = check_request(req)
    urls = parse_servers(servers)
    key = key_for(urls, parse_servers(typed) if typed else ())
    pool = [Server(url, timeout, key) for url in urls]
    jobs = image_jobs(req)
    share = [[j for j in jobs if j[0] % len(pool) == k] for k in range(len(pool))]
    events: queue.Queue = queue.Queue()
    threads: list = []
    started = time.monotonic()
    images: dict = {}
    done = [0] * len(pool)
    total = [len(js) for js in share]
    slot = {id(s): k for k, s in enumerate(pool)}

    def report():
        if on_progress is not None:
            on_progress(Progress([s.url for s in pool], list(done), total, time.monotonic() - started))

    try:
        served = check_servers(pool, model, check)
        threads = [threading.Thread(target=_worker, args=(s, m, req, js, events), daemon=True,
                                    name=f"nextstep-remote-{k}")
                   for k, (s, m, js) in enumerate(zip(pool, served, share)) if js]
        for t in threads:
            t.start()
        report()
        last = time.monotonic()
        while len(images) < count:
            try:
                kind, server, index, value = events.get(timeout=POLL_S)
            except queue.Empty:
                if check is not None:
                    check()
                if time.monotonic() - last >= TICK_S:
                    last = time.monotonic()
                    report()
                continue
            if kind == "error":
                raise value
            images[index] = value
            done[slot[id(server)]] += 1
            last = time.monotonic()
            report()
            if check is not None:
                check()
    except BaseException:
        for s in pool:
            s.abort()
        deadline = time.monotonic() + JOIN_S
        for t in threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))
        raise
    for t in threads:
        t.join()
    order = sorted(images)
    return RemoteResult(images=torch.stack([images[i] for i in order]),
                        drawn_by=[pool[i % len(pool)].url for i in order],
                        seeds=[j[2] for j in jobs], model=served[0])
