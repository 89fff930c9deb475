"""The API key goes only to servers the user trusts (NEXTSTEP_SERVER_HOSTS, or the CLI's --server),
never to one a workflow names, and never over plain http to another machine unless the user wrote
http:// for it. Against stand-in servers on 127.0.0.1 (tests/vllm_stand_in.py): an untrusted one
must receive no request at all, not even /health."""
from __future__ import annotations

import socket

import pytest

from host_stand_in import host, models_dir, pack  # noqa: F401
from test_remote import request
from test_remote_nodes import result_of, server_parts, status, t2i  # noqa: F401
from vllm_stand_in import stand_ins

from nextstep_core.cli import main
from nextstep_core.remote import API_KEY_ENV, HOSTS_ENV, draw
from nextstep_core.remote.servers import ServerError
from nextstep_core.remote.trust import key_for, parse_hosts

KEY = "sk-trust-" + "q" * 12
FAR = "gpu-box.nextstep.test"   # a name that is not loopback; the tests route it to the stand-in


def entry(server) -> str:
    """host:port of a stand-in."""
    return server.url.split("://", 1)[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.delenv(HOSTS_ENV, raising=False)


@pytest.fixture
def far_host(monkeypatch):
    """Connections to FAR reach 127.0.0.1, as if a hosts file named another machine: the client
    still sees a host that is not loopback."""
    real = socket.create_connection

    def connect(address, *args, **kwargs):
        host, port = address
        return real(("127.0.0.1" if host == FAR else host, port), *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", connect)


def keys_seen(server) -> set:
    return {h.get("Authorization") for h in server.headers}


def test_a_trusted_server_gets_the_key_on_every_request(monkeypatch):
    with stand_ins(1, api_key=KEY) as (server,):
        monkeypatch.setenv(API_KEY_ENV, KEY)
        monkeypatch.setenv(HOSTS_ENV, f"other-box:8091, {entry(server)}")
        result = draw([server.url], request())
    assert result.images.shape == (1, 32, 64, 3)
    assert [m for m, _ in server.paths] == ["GET", "GET", "POST"] and keys_seen(server) == {f"Bearer {KEY}"}


def test_an_untrusted_server_gets_nothing_and_the_user_is_told_what_to_set(monkeypatch):
    """One listed server and one a workflow added: the run stops before either is asked anything."""
    with stand_ins(1) as (mine,), stand_ins(1) as (theirs,):
        monkeypatch.setenv(API_KEY_ENV, KEY)
        monkeypatch.setenv(HOSTS_ENV, entry(mine))
        with pytest.raises(ServerError) as info:
            draw([mine.url, theirs.url], request())
        assert mine.paths == [] and theirs.paths == []
    message = str(info.value)
    assert theirs.url in message and HOSTS_ENV in message and entry(theirs) in message and API_KEY_ENV in message
    assert mine.url not in message and KEY not in message


def test_a_host_is_trusted_on_the_port_listed_or_on_every_port_when_none_is(monkeypatch):
    with stand_ins(1) as (server,):
        monkeypatch.setenv(API_KEY_ENV, KEY)
        port = int(entry(server).rsplit(":", 1)[1])
        monkeypatch.setenv(HOSTS_ENV, f"127.0.0.1:{port + 1 if port < 65535 else port - 1}")
        with pytest.raises(ServerError, match=HOSTS_ENV):
            draw([server.url], request())
        assert server.paths == []
        monkeypatch.setenv(HOSTS_ENV, "127.0.0.1")
        draw([server.url], request())
    assert keys_seen(server) == {f"Bearer {KEY}"}


def test_without_a_key_nothing_changes(monkeypatch):
    monkeypatch.setenv(HOSTS_ENV, "not a host/at all")  # not even read without a key
    with stand_ins(1) as (server,):
        draw([server.url], request())
    assert len(server.paths) == 3 and keys_seen(server) == {None}


def test_plain_http_to_another_machine_needs_an_explicit_http_entry(monkeypatch, far_host):
    with stand_ins(1, api_key=KEY) as (server,):
        port = entry(server).rsplit(":", 1)[1]
        url = f"http://{FAR}:{port}"
        monkeypatch.setenv(API_KEY_ENV, KEY)
        monkeypatch.setenv(HOSTS_ENV, f"{FAR}:{port}")
        with pytest.raises(ServerError, match="plain http") as info:
            draw([url], request())
        assert server.paths == []
        assert f"http://{FAR}:{port}" in str(info.value) and HOSTS_ENV in str(info.value)
        monkeypatch.setenv(HOSTS_ENV, f"http://{FAR}:{port}")
        draw([url], request())
    assert len(server.paths) == 3 and keys_seen(server) == {f"Bearer {KEY}"}


def test_loopback_over_http_needs_no_http_entry():
    """This machine's own servers are reached without crossing a network; https rules for the rest."""
    env = {API_KEY_ENV: KEY, HOSTS_ENV: "localhost:8091,[::1]:8091,127.0.0.1:8091,gpu:8091,https://gpu:443"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        urls = ["http://localhost:8091", "http://[::1]:8091", "http://127.0.0.1:8091", "https://gpu:8091",
                "https://gpu"]
        assert key_for(urls) == KEY
        with pytest.raises(ServerError, match="plain http"):
            key_for(["http://gpu:8091"])


@pytest.mark.parametrize("text", ["gpu/v1", "ftp://gpu:1", "gpu:port", "http://gpu:1?x=1", "user@gpu"])
def test_bad_host_entries_name_the_variable(text):
    with pytest.raises(ServerError, match=f"{HOSTS_ENV} holds"):
        parse_hosts(text)


def test_host_entries():
    got = [(t.host, t.port, t.plain_http) for t in parse_hosts("GPU-Box:8091 http://10.0.0.5:80, [::1], https://a/")]
    assert got == [("gpu-box", 8091, False), ("10.0.0.5", 80, True), ("::1", None, False), ("a", None, False)]


def test_the_cli_trusts_the_servers_typed_for_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(API_KEY_ENV, KEY)
    with stand_ins(1, api_key=KEY) as (server,):
        assert main(["generate", "--server", server.url, "--prompt", "a kite", "--width", "32", "--height", "32",
                     "--quiet", "--out", str(tmp_path / "k.png")]) == 0
    assert keys_seen(server) == {f"Bearer {KEY}"} and (tmp_path / "k.png").is_file()


def test_the_cli_keeps_the_http_rule(tmp_path, monkeypatch, capsys, far_host):
    monkeypatch.setenv(API_KEY_ENV, KEY)
    with stand_ins(1, api_key=KEY) as (server,):
        url = f"http://{FAR}:{entry(server).rsplit(':', 1)[1]}"
        assert main(["generate", "--server", url, "--prompt", "a kite", "--width", "32", "--height", "32",
                     "--out", str(tmp_path / "k.png")]) == 2
        assert server.paths == []
    err = capsys.readouterr().err
    assert "plain http" in err and HOSTS_ENV in err and KEY not in err and not (tmp_path / "k.png").exists()


def test_a_workflows_server_node_cannot_take_the_key(pack, host, status, monkeypatch):
    """The node's `servers` widget is what a shared workflow carries: with a key set it must be
    listed by the user, or the graph stops before the server hears anything."""
    monkeypatch.setenv(API_KEY_ENV, KEY)
    with stand_ins(1) as (server,):
        with pytest.raises(pack.nextstep_core.errors.NextStepError) as info:
            t2i(pack, server_parts(pack, [server]))
        assert server.paths == []
        assert server.url in str(info.value) and HOSTS_ENV in str(info.value)
        monkeypatch.setenv(HOSTS_ENV, entry(server))
        images, _ = result_of(t2i(pack, server_parts(pack, [server])))
    assert images.shape == (1, 32, 64, 3) and keys_seen(server) == {f"Bearer {KEY}"}
