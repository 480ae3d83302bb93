"""Parse the L4 tier's `remote_url` into a `RemoteURL`, without connecting to anything.

Accepted forms (the first three read as redis-py's `Redis.from_url` reads them):

    redis://[[user]:password@]host[:port][/db][?db=N]           plain TCP, one server
    rediss://[[user]:password@]host[:port][/db][?ssl_...=...]    TLS, one server
    unix://[[user]:password@]/path/to/redis.sock[?db=N]          Unix socket, one server
    redis-cluster://[[user]:password@]h1[:p1],h2[:p2],...        Redis Cluster, seed nodes
    rediss-cluster://[[user]:password@]h1[:p1],...[?ssl_...=...] Redis Cluster over TLS

- port defaults to 6379 (as in redis-py); it must be 1..65535. IPv6 hosts go in brackets: `[::1]:6379`.
- user and password are percent-decoded (`%40` for `@`, `%3A` for `:`); query values are decoded as
  redis-py decodes them (`+` is a space).
- db: from the path or `?db=`; Redis Cluster has only db 0, so any other db there is an error.
- TLS query options (rediss schemes only): ssl_ca_certs, ssl_certfile, ssl_keyfile (file paths),
  ssl_cert_reqs (none | optional | required), ssl_check_hostname (true | false). Any other query
  option is an error: a typo must not silently turn verification off.
Every malformed URL raises `ConfigError` (a `ValueError`), whose message never contains the password.

Also the one home of the text conventions `config_keys` shares with it: `MASK` (how a secret is shown),
`BOOL_WORDS` (the boolean words accepted in text) and `did_you_mean` (the hint in errors).
"""

import difflib
import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import quote, quote_plus, unquote, unquote_plus

from lmcache_core.errors import ConfigError

DEFAULT_PORT = 6379
MASK = "***"  # what a secret (a password, cache_secret) reads as in every repr, URL and error message
BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}  # any case

# scheme -> (uses TLS, is a cluster)
SCHEMES: dict[str, tuple[bool, bool]] = {
    "redis": (False, False),
    "rediss": (True, False),
    "unix": (False, False),
    "redis-cluster": (False, True),
    "rediss-cluster": (True, True),
}
CERT_REQS = ("none", "optional", "required")
_TLS_QUERY_KEYS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?\Z")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


@dataclass(frozen=True)
class TLSOptions:
    """TLS settings of a rediss URL; None means "redis-py's default"."""

    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    cert_reqs: str | None = None
    check_hostname: bool | None = None

    def __post_init__(self):
        if self.cert_reqs is not None and self.cert_reqs not in CERT_REQS:
            raise ConfigError(f"ssl_cert_reqs: expected one of {CERT_REQS}, got {self.cert_reqs!r}")


@dataclass(frozen=True)
class RemoteURL:
    """A parsed remote_url. `nodes` holds (host, port) pairs: one for redis/rediss, the seed list for a
    cluster, none for unix. The password never appears in repr() or str()."""

    scheme: str
    nodes: tuple[tuple[str, int], ...] = ()
    unix_path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TLSOptions | None = None

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown scheme {self.scheme!r}; expected one of {', '.join(SCHEMES)}")
        uses_tls, cluster = SCHEMES[self.scheme]
        if (self.tls is not None) != uses_tls:
            raise ConfigError(f"scheme {self.scheme!r}: tls must be {'set' if uses_tls else 'None'}")
        if self.scheme == "unix":
            if self.nodes or not self.unix_path or not self.unix_path.startswith("/") or "\0" in self.unix_path:
                raise ConfigError("unix URL: needs an absolute socket path and no host, e.g. unix:///run/redis.sock")
        else:
            if self.unix_path is not None:
                raise ConfigError(f"scheme {self.scheme!r} takes a host, not a socket path")
            if not self.nodes or (not cluster and len(self.nodes) != 1):
                raise ConfigError(f"scheme {self.scheme!r}: expected {'1+' if cluster else 'exactly 1'} host(s)")
            for host, port in self.nodes:
                _check_host(host)
                if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                    raise ConfigError(f"port of {host!r}: expected an integer in 1..65535, got {port!r}")
            if len(set(self.nodes)) != len(self.nodes):
                raise ConfigError(f"{self.scheme} URL: a node is listed twice")
        if isinstance(self.db, bool) or not isinstance(self.db, int) or self.db < 0:
            raise ConfigError(f"db: expected an integer >= 0, got {self.db!r}")
        if cluster and self.db != 0:
            raise ConfigError(f"db {self.db} in a {self.scheme} URL: Redis Cluster has only db 0")

    @property
    def is_cluster(self) -> bool:
        return SCHEMES[self.scheme][1]

    @property
    def uses_tls(self) -> bool:
        return self.tls is not None

    def __repr__(self) -> str:
        password = None if self.password is None else MASK
        return (
            f"RemoteURL(scheme={self.scheme!r}, nodes={self.nodes!r}, unix_path={self.unix_path!r}, "
            f"db={self.db!r}, username={self.username!r}, password={password!r}, tls={self.tls!r})"
        )

    def __str__(self) -> str:
        return self.to_url()

    def to_url(self, *, show_password: bool = False) -> str:
        """The URL back as text (parse(u.to_url(show_password=True)) == u); the password is *** unless asked."""
        auth = ""
        if self.username is not None or self.password is not None:
            auth = quote(self.username or "", safe="")
            if self.password is not None:
                auth += ":" + (quote(self.password, safe="") if show_password else MASK)
            auth += "@"
        query = {}
        if self.scheme == "unix":
            where = quote(self.unix_path, safe="/")
            if self.db:
                query["db"] = str(self.db)
        else:
            where = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.nodes)
            if self.db:
                where += f"/{self.db}"
        if self.tls is not None:
            for key in _TLS_QUERY_KEYS:
                value = getattr(self.tls, key.removeprefix("ssl_"))
                if value is not None:
                    query[key] = str(value).lower() if isinstance(value, bool) else value
        tail = "&".join(f"{k}={quote_plus(v, safe='/')}" for k, v in query.items())
        return f"{self.scheme}://{auth}{where}" + (f"?{tail}" if tail else "")

    def redis_kwargs(self) -> dict:
        """Keyword arguments for redis-py: for redis/rediss/unix, those `Redis(**kw)` takes (what
        `Redis.from_url` would derive); for a cluster, all but the location, which the caller passes as
        `startup_nodes=[ClusterNode(h, p) for h, p in url.nodes]`."""
        kw: dict = {}
        if self.scheme == "unix":
            kw["unix_socket_path"] = self.unix_path
        elif not self.is_cluster:
            kw["host"], kw["port"] = self.nodes[0]
        if not self.is_cluster:
            kw["db"] = self.db
        if self.username is not None:
            kw["username"] = self.username
        if self.password is not None:
            kw["password"] = self.password
        if self.tls is not None:
            kw["ssl"] = True
            for key in _TLS_QUERY_KEYS:
                value = getattr(self.tls, key.removeprefix("ssl_"))
                if value is not None:
                    kw[key] = value
        return kw


def parse_remote_url(url: str) -> RemoteURL:
    """Parse `url` (see the module docstring for the forms); raise ConfigError when it is malformed."""
    try:
        return _parse(url)
    except ConfigError as e:
        raise ConfigError(_without_password(str(e), url)) from None


def _parse(url: str) -> RemoteURL:
    if not isinstance(url, str):
        raise ConfigError(f"remote URL: expected a string, got {type(url).__name__}")
    if "://" not in url:
        raise ConfigError(f"remote URL {_redact(url)!r}: no scheme; expected e.g. redis://host:6379")
    scheme, rest = url.split("://", 1)
    if scheme not in SCHEMES:
        hint = did_you_mean(scheme.lower(), SCHEMES)
        raise ConfigError(f"remote URL: unknown scheme {scheme!r}; expected one of {', '.join(SCHEMES)}{hint}")
    bad = next((c for c in url if c.isspace() or not c.isprintable()), None)
    if bad is not None:
        raise ConfigError(f"remote URL {_redact(url)!r}: contains {bad!r}; percent-encode it (%20 for a space)")
    if "#" in rest:
        raise ConfigError(f"remote URL {_redact(url)!r}: a fragment ('#') is not allowed; write '#' as %23")
    rest, _, query_text = rest.partition("?")
    cut = rest.find("/")
    authority, path = (rest, "") if cut < 0 else (rest[:cut], rest[cut:])
    userinfo, at, hostpart = authority.rpartition("@")
    username = password = None
    if at:
        user_text, colon, pw_text = userinfo.partition(":")
        username = _decode(user_text, "username") or None
        password = (_decode(pw_text, "password") or None) if colon else None
    query = _parse_query(query_text, scheme)
    db = _parse_db(path, query.pop("db", None), scheme)
    uses_tls, cluster = SCHEMES[scheme]
    tls = _tls_options(query) if uses_tls else None
    if scheme == "unix":
        if hostpart:
            raise ConfigError(
                f"unix URL: {hostpart!r} stands where the host would; the socket path must be absolute: "
                "unix:///path/to/redis.sock (three slashes)"
            )
        return RemoteURL(scheme, unix_path=_decode(path, "socket path"), db=db,
                         username=username, password=password)
    if not hostpart:
        raise ConfigError(f"remote URL {_redact(url)!r}: no host")
    parts = hostpart.split(",")
    if len(parts) > 1 and not cluster:
        raise ConfigError(f"remote URL: {len(parts)} hosts need a cluster scheme ({scheme}-cluster://h1:p1,h2:p2)")
    nodes = tuple(_parse_node(p, i) for i, p in enumerate(parts))
    return RemoteURL(scheme, nodes=nodes, db=db, username=username, password=password, tls=tls)


def _parse_node(text: str, index: int) -> tuple[str, int]:
    if not text:
        raise ConfigError(f"remote URL: node #{index + 1} in the host list is empty (stray comma?)")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"remote URL: {text!r}: '[' without ']' around an IPv6 address")
        host, tail = text[1:end], text[end + 1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"remote URL: {host!r} in brackets is not an IPv6 address") from None
        if tail and not tail.startswith(":"):
            raise ConfigError(f"remote URL: unexpected {tail!r} after ']' in {text!r}")
        port_text = tail[1:] if tail else None
    else:
        if text.count(":") > 1:
            raise ConfigError(f"remote URL: {text!r}: put an IPv6 address in brackets, e.g. [::1]:6379")
        host, colon, port_text = text.partition(":")
        if not colon:
            port_text = None
        if not host:
            raise ConfigError(f"remote URL: no host before ':{port_text}'")
        _check_host(host)
    if port_text is None:
        return host, DEFAULT_PORT
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5 or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"remote URL: port of {host!r}: expected an integer in 1..65535, got {port_text!r}")
    return host, int(port_text)


def _check_host(host: str) -> None:
    if not isinstance(host, str) or not host:
        raise ConfigError(f"remote URL: expected a host name or address, got {host!r}")
    if ":" in host:  # stored without brackets
        try:
            ipaddress.IPv6Address(host)
            return
        except ValueError:
            raise ConfigError(f"remote URL: {host!r} is not a valid IPv6 address") from None
    labels = host.split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise ConfigError(f"remote URL: {host!r} is not a valid host name (letters, digits, '-', '_', '.')")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ConfigError(f"remote URL: {host!r} is not a valid IPv4 address") from None


def _parse_query(text: str, scheme: str) -> dict[str, str]:
    allowed = ("db",) + (_TLS_QUERY_KEYS if SCHEMES[scheme][0] else ())
    out: dict[str, str] = {}
    for item in text.split("&") if text else ():
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"remote URL: query item {item!r} is not key=value")
        if key not in allowed:
            if key in _TLS_QUERY_KEYS:
                raise ConfigError(f"remote URL: {key} is a TLS option; TLS needs rediss:// or rediss-cluster://")
            raise ConfigError(f"remote URL: unknown query option {key!r}; allowed: {', '.join(allowed)}"
                              f"{did_you_mean(key, allowed)}")
        if key in out:
            raise ConfigError(f"remote URL: query option {key!r} given twice")
        if _BAD_PERCENT.search(value):
            raise ConfigError(f"remote URL: query option {key}: '%' must start a %XX escape")
        try:
            out[key] = unquote_plus(value, errors="strict")
        except UnicodeDecodeError:
            raise ConfigError(f"remote URL: query option {key}: percent escapes are not valid UTF-8") from None
    return out


def _parse_db(path: str, query_db: str | None, scheme: str) -> int:
    path_db = None
    if scheme != "unix" and path not in ("", "/"):
        path_db = path[1:]
        if not (path_db.isascii() and path_db.isdigit()):
            raise ConfigError(f"remote URL: path {path!r}: expected /<db number> or nothing")
    if path_db is not None and query_db is not None and int(path_db) != _db_number(query_db):
        raise ConfigError(f"remote URL: db given twice and differently (path {path_db}, ?db={query_db})")
    db = _db_number(query_db if query_db is not None else path_db or "0")
    if SCHEMES[scheme][1] and db != 0:
        raise ConfigError(f"remote URL: db {db} in a {scheme} URL; Redis Cluster has only db 0")
    return db


def _db_number(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        raise ConfigError(f"remote URL: db: expected a non-negative integer, got {text!r}")
    return int(text)


def _tls_options(query: dict[str, str]) -> TLSOptions:
    check = query.get("ssl_check_hostname")
    if check is not None:
        if check.lower() not in BOOL_WORDS:
            raise ConfigError(f"remote URL: ssl_check_hostname: expected true or false, got {check!r}")
        check = BOOL_WORDS[check.lower()]
    reqs = query.get("ssl_cert_reqs")
    if reqs is not None and reqs.lower() not in CERT_REQS:
        raise ConfigError(f"remote URL: ssl_cert_reqs: expected one of {CERT_REQS}, got {reqs!r}")
    return TLSOptions(
        ca_certs=query.get("ssl_ca_certs") or None,
        certfile=query.get("ssl_certfile") or None,
        keyfile=query.get("ssl_keyfile") or None,
        cert_reqs=reqs.lower() if reqs is not None else None,
        check_hostname=check,
    )


def _decode(text: str, what: str) -> str:
    if _BAD_PERCENT.search(text):
        raise ConfigError(f"remote URL: {what}: '%' must start a %XX escape (write a literal '%' as %25)")
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ConfigError(f"remote URL: {what}: percent escapes are not valid UTF-8") from None


def _redact(url: str) -> str:
    """url with everything between the user name and the URL's last '@' replaced by ***. Not the last '@'
    of the authority: a password written with '#', '/' or '?' unencoded would end the authority early."""
    scheme, sep, rest = url.partition("://") if "://" in url else ("", "", url)
    userinfo, at, tail = rest.rpartition("@")
    if not at:
        return url
    return f"{scheme}{sep}{userinfo.partition(':')[0]}:{MASK}@{tail}"


def _without_password(message: str, url) -> str:
    """`message`, or a generic one when the user info holds an unencoded '/', '?' or '#': the parser then cuts
    the authority inside the password, and pieces of it can land in the host, port, path or query an error
    names. Otherwise the user info is parsed whole and no message shows it but through `_redact`."""
    if not isinstance(url, str) or "@" not in url:
        return message
    rest = url.partition("://")[2] or url
    if not re.search(r"[/?#]", rest[: rest.rfind("@")]):
        return message
    return (f"remote URL {_redact(url)!r} is malformed; percent-encode reserved characters in the user name and "
            "password (%23 for '#', %2F for '/', %3F for '?', %40 for '@')")


def did_you_mean(word, choices) -> str:
    """"; did you mean 'x'?" naming the closest of `choices` to `word`, or "" when none is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
