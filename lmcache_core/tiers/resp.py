"""RedisTier's pipelines on redis-py connections, with a lean RESP2/RESP3 reply reader.

redis-py's reader feeds every 64 KiB socket read to hiredis and asks it for a reply each time; for a large
value hiredis looks again at everything buffered so far, so reading a multi-megabyte value costs time
quadratic in its size (redis-py GETs of 5.9 MB values: 0.64 GB/s over loopback, the same replies read raw:
1.2 GB/s, on 2 cores). Here a bulk string's bytes go from the socket straight into their own buffer (one
kernel copy) once its length is known. Connections, AUTH, TLS and unix sockets stay redis-py's: commands are
packed and sent by the connection, only the replies are read here.

Replies (RESP2 and RESP3, which redis-py negotiates when the server speaks it): bulk strings as `bytearray`,
nil as None, integers as int, status lines as str, arrays and sets as lists, maps as dicts, errors as the
exception redis-py would raise for them (not raised: one per command, in place); RESP3 push messages and
attributes are skipped.

The lean reader reads the connection's socket (`conn._sock`) and builds errors with redis-py's
`redis._parsers.BaseParser.parse_error`: internals, so redis-py must be within REDIS_PY_RANGE (the range
the tests ran on, pyproject's pin); importing this module outside it raises ImportError. Where either
internal is missing, or with `lean=False`, replies are read by redis-py's own reader
(`Connection.read_response`): bulk strings and status lines then come back as `bytes`.
"""

import re
import socket
import time

import redis
import redis.exceptions as rex

# lowest and highest redis-py tested, both included (pyproject.toml's pin; 8.0.1, 8.1.0 and 8.2.0 pass the
# Redis tests). Before 8.0 RedisClient's slot-map refresh (NodesManager.initialize(last_failed_node_name=))
# does not exist; 8.0.0 cannot connect over a unix socket.
REDIS_PY_RANGE = ("8.0.1", "8.2.0")


def _version(text: str) -> tuple[int, int, int]:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        raise ValueError(f"redis-py version: expected 'X.Y[.Z]...', got {text!r}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def check_redis_py(version: str) -> None:
    """Raise ImportError unless redis-py `version` lies in REDIS_PY_RANGE (pre-releases count as their
    release: 8.2.0rc1 is 8.2.0)."""
    low, high = (_version(v) for v in REDIS_PY_RANGE)
    if not low <= _version(version) <= high:
        raise ImportError(f"lmcache_core needs redis-py {REDIS_PY_RANGE[0]} to {REDIS_PY_RANGE[1]} (its L4 tier "
                          f"uses redis-py internals, tested on that range), but redis {version} is installed: "
                          f"pip install 'redis>={REDIS_PY_RANGE[0]},<={REDIS_PY_RANGE[1]}'")


check_redis_py(redis.__version__)
try:
    from redis._parsers import BaseParser

    _parse_error = BaseParser.parse_error
except (ImportError, AttributeError):  # an internal moved: read with redis-py's own reader
    _parse_error = None

MAX_BULK = 512 * 2**20  # Redis' own limit (proto-max-bulk-len): a longer length is a broken stream
MAX_DEPTH = 16  # nested aggregates; ours are at most 2 deep
_CHUNK = 256 * 1024  # read buffer; also the longest reply line accepted


class _Reader:
    def __init__(self, sock: socket.socket, deadline: float | None = None):
        """deadline (time.monotonic()): every read ends by then; None: the socket's own timeout per read."""
        self._sock, self._deadline = sock, deadline
        self._buf = bytearray(_CHUNK)
        self._view = memoryview(self._buf)
        self._start = self._end = 0

    def _recv_into(self, view: memoryview) -> int:
        try:
            if self._deadline is not None:
                self._sock.settimeout(max(self._deadline - time.monotonic(), 1e-3))
            n = self._sock.recv_into(view)
        except socket.timeout as e:
            raise rex.TimeoutError("Timeout reading from socket") from e
        except OSError as e:
            raise rex.ConnectionError(f"Error while reading from socket: {e}") from e
        if n == 0:
            raise rex.ConnectionError("Connection closed by server.")
        return n

    def _fill(self) -> None:
        """Read more into the buffer, first moving what is unread to its start."""
        if self._start:
            n = self._end - self._start
            self._buf[:n] = self._view[self._start:self._end]
            self._start, self._end = 0, n
        if self._end == len(self._buf):
            raise rex.InvalidResponse(f"reply line longer than {_CHUNK} bytes")
        self._end += self._recv_into(self._view[self._end:])

    def _line(self) -> bytes:
        while True:
            i = self._buf.find(b"\r\n", self._start, self._end)
            if i >= 0:
                line = bytes(self._view[self._start:i])
                self._start = i + 2
                return line
            self._fill()

    def _bulk(self, n: int) -> bytearray:
        out = bytearray(n)
        with memoryview(out) as view:
            got = min(n, self._end - self._start)
            view[:got] = self._view[self._start:self._start + got]
            self._start += got
            while got < n:  # the rest straight from the socket
                got += self._recv_into(view[got:])
        while self._end - self._start < 2:
            self._fill()
        if self._buf[self._start:self._start + 2] != b"\r\n":
            raise rex.InvalidResponse("bulk string not followed by CRLF")
        self._start += 2
        return out

    def reply(self, depth: int = 0):
        if depth > MAX_DEPTH:
            raise rex.InvalidResponse(f"replies nested deeper than {MAX_DEPTH}")
        line = self._line()
        kind, rest = line[:1], line[1:]
        if not kind:
            raise rex.InvalidResponse("empty reply line")
        if kind in b"+-_#,":
            return self._simple(kind, rest, line)
        if kind not in b":($=!*~%>|":
            raise rex.InvalidResponse(f"unknown reply type in {line[:40]!r}")
        try:
            n = int(rest)
        except ValueError:
            raise rex.InvalidResponse(f"bad number in reply line {line[:40]!r}") from None
        if kind in (b":", b"("):  # integer, big number
            return n
        if kind in (b"$", b"=", b"!"):  # bulk / verbatim string (RESP3: "txt:..."), bulk error
            if n < 0:
                return None
            if n > MAX_BULK:
                raise rex.InvalidResponse(f"bulk string of {n} bytes exceeds {MAX_BULK}")
            data = self._bulk(n)
            if kind == b"!":
                return _parse_error(data.decode(errors="replace"))
            return data[4:] if kind == b"=" else data
        if kind in (b"*", b"~"):  # array, set
            return None if n < 0 else [self.reply(depth + 1) for _ in range(n)]
        if kind == b"%":  # map
            return {self._key(self.reply(depth + 1)): self.reply(depth + 1) for _ in range(n)}
        # RESP3 push (out of band) or attributes: skipped, the reply follows
        for _ in range(n if kind == b">" else 2 * n):
            self.reply(depth + 1)
        return self.reply(depth)

    @staticmethod
    def _simple(kind: bytes, rest: bytes, line: bytes):
        if kind == b"+":
            return rest.decode(errors="replace")
        if kind == b"-":
            return _parse_error(rest.decode(errors="replace"))
        if kind == b"_":  # RESP3 null
            return None
        if kind == b"#":
            return rest == b"t"
        try:
            return float(rest)
        except ValueError:
            raise rex.InvalidResponse(f"bad double in reply line {line[:40]!r}") from None

    @staticmethod
    def _key(k):
        return bytes(k) if isinstance(k, bytearray) else k


def execute(client: redis.Redis, commands: list[tuple], *, lean: bool = True) -> list:
    """Send `commands` in one pipeline on a connection of `client`'s pool; their replies, in order.

    A fault (connection, timeout, broken stream) closes that connection and raises a redis-py exception;
    an error reply is returned in its command's place. lean=False reads with redis-py's reader."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command(conn.pack_commands(commands))
        return _replies(conn, len(commands), lean)
    except BaseException:
        conn.disconnect()  # the stream's position is unknown: never reuse it
        raise
    finally:
        pool.release(conn)


def execute_each(batches: list[tuple[redis.Redis, list[tuple]]], timeout: float) -> list:
    """`execute` on several servers (one batch each) from the calling thread: every pipeline is sent before any
    reply is read, so the servers work at once without handing work to other threads (for small replies:
    large values read faster on threads). Per batch its replies, or the fault that closed its connection;
    the reads of all batches end within `timeout` of the call (lean reader; each connect has its own)."""
    deadline = time.monotonic() + timeout
    out: list = [None] * len(batches)
    conns = []
    try:
        for i, (client, commands) in enumerate(batches):
            try:
                conn = client.connection_pool.get_connection()
            except Exception as e:  # noqa: BLE001 - a fault of this server only: its batch's answer
                out[i] = e
                continue
            conns.append((i, client.connection_pool, conn))
            try:
                conn.send_packed_command(conn.pack_commands(commands))
            except Exception as e:  # noqa: BLE001
                conn.disconnect()
                out[i] = e
        for i, _, conn in conns:
            if out[i] is None:
                try:
                    out[i] = _replies(conn, len(batches[i][1]), True, deadline)
                except Exception as e:  # noqa: BLE001
                    conn.disconnect()
                    out[i] = e
    except BaseException:  # interrupted: no stream's position is known
        for _, _, conn in conns:
            conn.disconnect()
        raise
    finally:
        for _, pool, conn in conns:
            pool.release(conn)
    return out


def _replies(conn, n: int, lean: bool, deadline: float | None = None) -> list:
    sock = getattr(conn, "_sock", None)
    if not (lean and _parse_error is not None and isinstance(sock, socket.socket)):
        return [_redis_py_reply(conn) for _ in range(n)]
    timeout = sock.gettimeout()
    try:
        reader = _Reader(sock, deadline)
        return [reader.reply() for _ in range(n)]
    finally:
        if deadline is not None:
            sock.settimeout(timeout)


def _redis_py_reply(conn) -> object:
    """One reply by redis-py's reader, an error reply in place (redis-py raises it, the stream intact)."""
    try:
        return conn.read_response(disable_decoding=True)
    except rex.ResponseError as e:
        return e
