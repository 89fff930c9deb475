"""NextStep-1.1 text-to-image drawn by vLLM-Omni servers over HTTP.

vLLM-Omni is the distributed engine for NextStep (CFG rows on two GPUs, a sharded backbone, one
server per machine); the pack is a client of it, not a second server. The same `Request` the
local pipeline takes goes out as one HTTP request per image, spread over the listed servers.
Standard library only, so nothing new is needed by people who never use a server.
"""
from .fanout import RemoteResult, draw
from .servers import API_KEY_ENV, DEFAULT_TIMEOUT, START_HINT, Server, parse_servers
from .trust import HOSTS_ENV

__all__ = ["API_KEY_ENV", "DEFAULT_TIMEOUT", "HOSTS_ENV", "START_HINT", "RemoteResult", "Server", "draw",
           "parse_servers"]
