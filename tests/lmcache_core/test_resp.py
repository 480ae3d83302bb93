"""RedisTier's reply reader (`tiers.resp`) against a real redis-server, over RESP2 and RESP3, and against a
listener that answers with a broken stream; the fallback to redis-py's own reader; the redis-py range."""

import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import redis
import redis.exceptions as rex
from redis.backoff import NoBackoff
from redis.retry import Retry

from lmcache_core.tiers import resp
from tests.redis_servers import free_port

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def client(request, redis_node):
    c = redis.Redis.from_url(redis_node.url, protocol=request.param, socket_timeout=2.0)
    yield c
    c.close()


def test_replies_of_every_kind_in_order(client):
    big = os.urandom(3 * 2**20 + 7)  # spans many socket reads and the reader's buffer
    replies = resp.execute(client, [
        ("SET", "big", big), ("SET", "small", b"x\r\ny"), ("GET", "big"), ("GET", "missing"),
        ("MGET", "small", "missing", "big"), ("EXISTS", "big"), ("INCR", "small"), ("STRLEN", "big"),
        ("PING",), ("EVAL", "return {1, 'two', false}", 0),
    ])
    assert replies[0] == "OK" and replies[1] == "OK"
    assert isinstance(replies[2], bytearray) and replies[2] == big
    assert replies[3] is None
    assert replies[4] == [b"x\r\ny", None, big]
    assert replies[5] == 1
    assert isinstance(replies[6], rex.ResponseError) and "not an integer" in str(replies[6])  # in place
    assert replies[7] == len(big)
    assert replies[8] == "PONG"
    assert replies[9] == [1, b"two", None]
    assert client.get("big") == big  # the connection went back to the pool in a clean state


def test_cluster_redirections_become_redis_py_errors(redis_cluster):
    node = redis_cluster.masters()[0]
    c = redis.Redis(host=node.host, port=node.port)
    replies = resp.execute(c, [("GET", f"key-{i}") for i in range(40)])  # most slots live elsewhere
    moved = [r for r in replies if isinstance(r, rex.MovedError)]
    assert moved and all(r.host and r.port for r in moved)
    assert all(r is None or isinstance(r, rex.MovedError) for r in replies)
    c.close()


def test_resp3_push_messages_are_skipped(redis_node):
    """A client-side caching invalidation arrives as a push between the replies of a RESP3 pipeline (the
    connection tracks the key it read, then writes it)."""
    c = redis.Redis.from_url(redis_node.url, protocol=3, socket_timeout=2.0)
    first_id = resp.execute(c, [("CLIENT", "ID")])
    replies = resp.execute(c, [("CLIENT", "TRACKING", "ON"), ("SET", "tracked", b"v1"), ("GET", "tracked"),
                               ("SET", "tracked", b"v2"), ("GET", "tracked"), ("PING",)])
    assert replies == ["OK", "OK", b"v1", "OK", b"v2", "PONG"]
    assert resp.execute(c, [("CLIENT", "ID")]) == first_id, "nothing was left unread: the same connection"
    c.close()


def _listener(answer: bytes):
    """A TCP listener that reads one request and writes `answer`, then holds the connection open (its
    server-side sockets are listed in the second value)."""
    srv = socket.create_server(("127.0.0.1", 0))
    conns = []

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conns.append(conn)
            conn.recv(65536)
            conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    return srv, conns


def _raw_client(srv, timeout):
    """A client whose connect sends nothing (no HELLO, no CLIENT SETINFO): the first request is ours."""
    return redis.Redis(host="127.0.0.1", port=srv.getsockname()[1], protocol=2, socket_timeout=timeout,
                       driver_info=None)


@pytest.mark.parametrize("answer,match", [
    (b"?what\r\n", "unknown reply type"),
    (b"$abc\r\n", "bad number"),
    (b"$%d\r\n" % (resp.MAX_BULK + 1), "exceeds"),
    (b"$3\r\nabcXY", "not followed by CRLF"),
    (b"\r\n", "empty reply line"),
    (b"*1\r\n" * 40, "nested deeper"),
])
def test_a_broken_stream_raises_and_the_connection_is_dropped(answer, match):
    srv, conns = _listener(answer)
    c = _raw_client(srv, timeout=1.0)
    with pytest.raises(rex.InvalidResponse, match=match):
        resp.execute(c, [("GET", "k")])
    conns[0].settimeout(2.0)
    assert conns[0].recv(1) == b"", "the client closed the connection (the stream's position is unknown)"
    c.close()
    srv.close()


def test_a_silent_server_times_out():
    srv, _ = _listener(b"$10\r\nabc")  # a bulk string that never completes
    c = _raw_client(srv, timeout=0.3)
    with pytest.raises(rex.TimeoutError):
        resp.execute(c, [("GET", "k")])
    c.close()
    srv.close()


# -- several servers from one thread ---------------------------------------------------------------------


def test_execute_each_sends_every_pipeline_then_reads_each(redis_node_factory):
    a, b = redis_node_factory(), redis_node_factory()
    ca, cb = redis.Redis.from_url(a.url, socket_timeout=2.0), redis.Redis.from_url(b.url, socket_timeout=2.0)
    out = resp.execute_each([(ca, [("SET", "k", b"a"), ("GET", "k")]), (cb, [("GET", "k"), ("INCR", "n"), ("PING",)])],
                            timeout=2.0)
    assert out == [["OK", b"a"], [None, 1, "PONG"]]
    assert ca.get("k") == b"a" and cb.get("n") == b"1"
    ca.close()
    cb.close()


def test_execute_each_a_fault_answers_its_batch_only_and_reads_end_by_the_deadline(redis_node):
    srv, _ = _listener(b"$10\r\nabc")  # a reply that never completes
    silent = _raw_client(srv, timeout=5.0)  # its own timeout is long: the call's deadline ends the read
    refused = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1.0,
                          retry=Retry(NoBackoff(), 0))  # as RedisClient makes them: no retries of its own
    good = redis.Redis.from_url(redis_node.url, socket_timeout=2.0)
    t0 = time.monotonic()
    out = resp.execute_each([(silent, [("GET", "k")]), (refused, [("PING",)]), (good, [("PING",)])], timeout=0.3)
    took = time.monotonic() - t0
    assert isinstance(out[0], rex.TimeoutError) and isinstance(out[1], rex.ConnectionError) and out[2] == ["PONG"]
    assert took < 0.3 + 1.0, took  # the deadline, plus a refused connect, plus slack for a loaded box
    # the good connection got its own timeout back: a command blocking 0.5 s outlasts the call's deadline
    assert resp.execute(good, [("BLPOP", "nothing-here", "0.5"), ("PING",)]) == [None, "PONG"]
    for c in (silent, refused, good):
        c.close()
    srv.close()


# -- redis-py's own reader (the fallback) ------------------------------------------------------------------


def _plain(reply):
    """A reply with bulk strings and status lines as bytes (the lean reader gives bytearray and str)."""
    if isinstance(reply, list):
        return [_plain(r) for r in reply]
    if isinstance(reply, (bytearray, str)):
        return bytes(reply.encode() if isinstance(reply, str) else reply)
    if isinstance(reply, Exception):
        return type(reply), str(reply)
    return reply


def test_the_fallback_reader_gives_the_same_replies(client):
    big = os.urandom(2 * 2**20 + 3)
    commands = [("SET", "big", big), ("GET", "big"), ("GET", "missing"), ("MGET", "big", "missing"),
                ("INCR", "big"), ("EXISTS", "big"), ("EVAL", "return {1, 'two', false}", 0), ("PING",)]
    lean = resp.execute(client, commands)
    fallback = resp.execute(client, commands, lean=False)
    assert _plain(fallback) == _plain(lean)
    assert fallback[1] == big and isinstance(fallback[4], rex.ResponseError), "error replies stay in place"
    assert resp.execute(client, [("GET", "big")], lean=False) == [big], "the connection is still in step"


def test_the_fallback_reader_gives_redirections_too(redis_cluster):
    cluster = redis_cluster.client()
    c = cluster.get_redis_connection(cluster.get_primaries()[0])  # a node's client, as RedisClient uses
    replies = resp.execute(c, [("GET", f"key-{i}") for i in range(40)], lean=False)
    assert any(isinstance(r, rex.MovedError) for r in replies)
    assert _plain(replies) == _plain(resp.execute(c, [("GET", f"key-{i}") for i in range(40)]))
    cluster.close()


def test_a_broken_stream_through_the_fallback_raises():
    srv, _ = _listener(b"?what\r\n")
    c = _raw_client(srv, timeout=1.0)
    with pytest.raises(rex.RedisError):
        resp.execute(c, [("GET", "k")], lean=False)
    c.close()
    srv.close()


# -- the redis-py versions this module accepts --------------------------------------------------------------


@pytest.mark.parametrize("version, ok", [("8.0.1", True), ("8.1.0", True), ("8.2.0", True), ("8.2.0rc1", True),
                                         ("8.0.0", False), ("7.4.1", False), ("8.2.1", False), ("9.0.0", False)])
def test_the_redis_py_range_is_checked(version, ok):
    if ok:
        resp.check_redis_py(version)
    else:
        with pytest.raises(ImportError, match=rf"needs redis-py 8\.0\.1 to 8\.2\.0 .* redis {re.escape(version)} "):
            resp.check_redis_py(version)
    resp.check_redis_py(redis.__version__)  # the one installed here is in the range


def test_pyproject_pins_the_same_range():
    line = next(x for x in PYPROJECT.read_text().splitlines() if x.strip().startswith('"redis'))
    assert line.strip().rstrip(",") == f'"redis>={resp.REDIS_PY_RANGE[0]},<={resp.REDIS_PY_RANGE[1]}"'
