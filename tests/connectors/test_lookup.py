"""The lookup channel between the scheduler and the workers: real unix sockets, real threads."""

import os
import stat
import threading
import time
import uuid

import pytest

from connectors.lookup import LookupClient, LookupServer, pack_hashes, socket_path, unpack_hashes

H = [bytes([i]) * 16 for i in range(5)]


def _server(rank: int, answer):
    path = socket_path(f"test-{uuid.uuid4()}", 0, 0, rank)
    return LookupServer(path, answer)


def test_every_rank_answers_in_rank_order():
    seen = []

    def answer_for(rank):
        def answer(op, header, hashes):
            seen.append((rank, op, header["owner"], hashes))
            return {"tiers": ["L2"] * (len(hashes) - rank)}
        return answer

    servers = [_server(r, answer_for(r)) for r in range(2)]
    client = LookupClient([s.path for s in servers], timeout_s=2.0)
    try:
        replies = client.ask("ask", {"owner": "req-1"}, H)
        assert [len(r["tiers"]) for r in replies] == [5, 4]
        assert sorted(seen, key=lambda x: x[0]) == [(0, "ask", "req-1", H), (1, "ask", "req-1", H)]
        assert stat.S_IMODE(os.stat(servers[0].path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(servers[0].path)).st_mode) == 0o700
    finally:
        client.close()
        for s in servers:
            s.close()
    assert not os.path.exists(servers[0].path)


def test_a_silent_rank_is_a_miss_within_the_timeout_and_late_answers_are_dropped():
    gate = threading.Event()

    def slow(op, header, hashes):
        gate.wait(5)
        return {"n": header["n"]}

    server = _server(0, slow)
    client = LookupClient([server.path], timeout_s=0.2)
    try:
        t0 = time.monotonic()
        assert client.ask("ask", {"n": 1}, H) == [None]
        assert time.monotonic() - t0 < 1.0
        gate.set()
        assert client.ask("ask", {"n": 2}, H) == [{"seq": 2, "n": 2}]  # the answer to n=1 was dropped
    finally:
        client.close()
        server.close()


def test_no_server_at_all_is_a_miss():
    client = LookupClient([socket_path(f"nobody-{uuid.uuid4()}", 0, 0, 0)], timeout_s=0.1)
    try:
        assert client.ask("ask", {}, H) == [None]
    finally:
        client.close()


def test_a_failing_handler_answers_an_error_and_keeps_serving():
    def answer(op, header, hashes):
        if op == "boom":
            raise RuntimeError("tier on fire")
        return {"ok": True}

    server = _server(0, answer)
    client = LookupClient([server.path], timeout_s=2.0)
    try:
        assert client.ask("boom", {}, H) == [None]
        assert client.ask("reset", {}) == [{"seq": 2, "ok": True}]
    finally:
        client.close()
        server.close()


def test_fire_and_forget_then_ask():
    got = []
    server = _server(0, lambda op, header, hashes: got.append(op) or {})
    client = LookupClient([server.path], timeout_s=2.0)
    try:
        assert client.ask("release", {"owner": "r"}, H, wait=False) == []
        assert client.ask("ask", {}, H)[0]["seq"] == 2
        assert got == ["release", "ask"]
    finally:
        client.close()
        server.close()


def test_hash_payload_round_trip_and_bad_length():
    assert unpack_hashes(pack_hashes(H)) == H and unpack_hashes(b"") == []
    with pytest.raises(ValueError, match="multiple of 16"):
        unpack_hashes(b"x" * 17)
