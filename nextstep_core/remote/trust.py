"""Which servers may receive the API key: the ones the user lists, outside any workflow.

A workflow travels as a file and inside every PNG it made, so the servers it names are not the
user's word: a shared graph could name any listener. The key therefore goes only to hosts listed
in NEXTSTEP_SERVER_HOSTS (set where ComfyUI or the shell starts), or typed as `--server` for one
CLI run. Plain http shows the key to everyone on the network path, so it is allowed only to this
machine (loopback) or to an entry the user wrote with an explicit `http://`.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Iterable, Optional
from urllib.parse import urlsplit

from .servers import API_KEY_ENV, ServerError

HOSTS_ENV = "NEXTSTEP_SERVER_HOSTS"
EXAMPLE = f"{HOSTS_ENV}=gpu-box:8091,127.0.0.1:8091"


@dataclass(frozen=True)
class Trusted:
    host: str                   # normalised: lower case, IP addresses in their short form
    port: Optional[int]         # None: every port of the host
    plain_http: bool            # the user wrote http:// for it: the key may cross the network unencrypted


def api_key() -> Optional[str]:
    key = os.environ.get(API_KEY_ENV, "").strip()
    return key or None


def normal_host(host: str) -> str:
    host = host.lower().rstrip(".")
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def where(host: str, port: Optional[int]) -> str:
    name = f"[{host}]" if ":" in host else host
    return name if port is None else f"{name}:{port}"


def _split(url: str):
    """-> (scheme, normalised host, port with the scheme's default filled in)."""
    parts = urlsplit(url)
    return parts.scheme, normal_host(parts.hostname or ""), parts.port or (443 if parts.scheme == "https" else 80)


def parse_hosts(text: str) -> list[Trusted]:
    """`host`, `host:port`, `[v6]:port`, `https://host:port` or `http://host:port`, separated by
    commas or spaces. A port left out trusts every port of the host."""
    entries = []
    for item in text.replace(",", " ").split():
        plain = item.lower().startswith("http://")
        parts = urlsplit(item if "://" in item else "//" + item)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("", "http", "https") or not parts.hostname or port == -1 or parts.query \
                or parts.fragment or parts.path not in ("", "/") or parts.username or parts.password:
            raise ServerError(f"{HOSTS_ENV} holds {item!r}, which is not a host: write host, host:port or "
                              f"http://host:port, separated by commas (e.g. {EXAMPLE}).")
        entries.append(Trusted(normal_host(parts.hostname), port, plain))
    return entries


def key_for(urls: Iterable[str], typed: Iterable[str] = ()) -> Optional[str]:
    """The API key to send to these servers, or None when none is set. Raises ServerError, before
    anything is sent, when a key is set and a server is not trusted with it. `typed`: server URLs
    the user typed for this run (the CLI's --server), trusted like listed hosts."""
    key = api_key()
    if key is None:
        return None
    trusted = parse_hosts(os.environ.get(HOSTS_ENV, ""))
    trusted += [Trusted(host, port, False) for _, host, port in map(_split, typed)]
    untrusted, plain = [], []
    for url in urls:
        scheme, host, port = _split(url)
        match = [t for t in trusted if t.host == host and t.port in (None, port)]
        needs_http = scheme == "http" and not is_loopback(host)
        if not match:
            untrusted.append((url, ("http://" if needs_http else "") + where(host, port)))
        elif needs_http and not any(t.plain_http for t in match):
            plain.append((url, "http://" + where(host, port)))
    if untrusted:
        listed = ", ".join(url for url, _ in untrusted)
        add = ",".join(entry for _, entry in untrusted)
        raise ServerError(
            f"{API_KEY_ENV} is set, and {listed} {'is' if len(untrusted) == 1 else 'are'} not among the servers you "
            f"trust with it, so nothing was sent. A workflow cannot choose who gets your key: if "
            f"{'it is your server' if len(untrusted) == 1 else 'they are your servers'}, add {add} to the "
            f"environment variable {HOSTS_ENV} (comma-separated host:port entries, e.g. {EXAMPLE}) where ComfyUI "
            "or the shell is started. Otherwise take it out of the servers (the NextStep Server node's `servers`).")
    if plain:
        listed = ", ".join(url for url, _ in plain)
        add = ",".join(entry for _, entry in plain)
        raise ServerError(
            f"{listed} uses plain http to another machine, so {API_KEY_ENV} would cross the network unencrypted; "
            f"nothing was sent. Serve it over https, or, on a network you trust, allow it by writing {add} (with "
            f"http://) in {HOSTS_ENV}.")
    return key
