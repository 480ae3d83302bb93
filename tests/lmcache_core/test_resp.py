"""RedisTier's reply reader (`tiers.resp`) against a real redis-server, over RESP2 and RESP3, and against a
listener that answers with a broken stream."""

import os
import socket
import threading

import pytest
import redis
import redis.exceptions as rex

from lmcache_core.tiers import resp


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
    """Client-side caching invalidations arrive as pushes between replies on a RESP3 connection."""
    c = redis.Redis.from_url(redis_node.url, protocol=3, socket_timeout=2.0)
    other = redis.Redis.from_url(redis_node.url)
    other.set("tracked", b"v1")
    assert resp.execute(c, [("CLIENT", "TRACKING", "ON"), ("GET", "tracked")]) == ["OK", b"v1"]
    other.set("tracked", b"v2")  # the server pushes an invalidation to `c`'s connection
    assert resp.execute(c, [("GET", "tracked"), ("PING",)]) == [b"v2", "PONG"]
    assert len(c.connection_pool._available_connections) == 1  # one connection, reused throughout
    c.close()
    other.close()


def _listener(answer: bytes):
    """A TCP listener that reads one request and writes `answer`, then holds the connection open."""
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
    assert not c.connection_pool._available_connections[0].is_connected
    c.close()
    srv.close()


def test_a_silent_server_times_out():
    srv, _ = _listener(b"$10\r\nabc")  # a bulk string that never completes
    c = _raw_client(srv, timeout=0.3)
    with pytest.raises(rex.TimeoutError):
        resp.execute(c, [("GET", "k")])
    c.close()
    srv.close()
