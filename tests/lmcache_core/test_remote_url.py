"""remote_url parsing: the accepted forms, every malformation as ConfigError, redis-py compatibility, and
round trips. Nothing here connects anywhere (10.0.0.1 is only parsed)."""

import ipaddress

import pytest
import redis.connection
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_core.errors import ConfigError, LMCacheError
from lmcache_core.remote_url import SCHEMES, RemoteURL, TLSOptions, parse_remote_url


@pytest.mark.parametrize("url, scheme, nodes, db, username, password", [
    pytest.param("redis://10.0.0.1:6379", "redis", (("10.0.0.1", 6379),), 0, None, None, id="users-example"),
    pytest.param("redis://localhost", "redis", (("localhost", 6379),), 0, None, None, id="default-port"),
    pytest.param("redis://h:7000/3", "redis", (("h", 7000),), 3, None, None, id="db-in-path"),
    pytest.param("redis://h:7000/?db=4", "redis", (("h", 7000),), 4, None, None, id="db-in-query"),
    pytest.param("redis://h/5?db=5", "redis", (("h", 6379),), 5, None, None, id="db-both-agree"),
    pytest.param("redis://user:pa%3Ass%40%2F@h:1", "redis", (("h", 1),), 0, "user", "pa:ss@/", id="percent"),
    pytest.param("redis://:pw@h", "redis", (("h", 6379),), 0, None, "pw", id="password-only"),
    pytest.param("redis://user@h", "redis", (("h", 6379),), 0, "user", None, id="user-only"),
    pytest.param("redis://:p@ss@h", "redis", (("h", 6379),), 0, None, "p@ss", id="raw-at-in-password"),
    pytest.param("redis://[::1]:6380", "redis", (("::1", 6380),), 0, None, None, id="ipv6"),
    pytest.param("redis://[2001:db8::7]", "redis", (("2001:db8::7", 6379),), 0, None, None, id="ipv6-no-port"),
    pytest.param("redis://redis_1.svc-a.local:65535", "redis", (("redis_1.svc-a.local", 65535),), 0, None, None,
                 id="dns-name-max-port"),
    pytest.param("redis-cluster://a:7000,b:7001,[::1]:7002", "redis-cluster",
                 (("a", 7000), ("b", 7001), ("::1", 7002)), 0, None, None, id="cluster"),
    pytest.param("redis-cluster://u:p@a", "redis-cluster", (("a", 6379),), 0, "u", "p", id="cluster-one-seed"),
    pytest.param("redis-cluster://a:1,b:2/0", "redis-cluster", (("a", 1), ("b", 2)), 0, None, None,
                 id="cluster-db0-allowed"),
])
def test_parse_network_urls(url, scheme, nodes, db, username, password):
    u = parse_remote_url(url)
    assert (u.scheme, u.nodes, u.db, u.username, u.password) == (scheme, nodes, db, username, password)
    assert u.unix_path is None and u.tls is None
    assert u.is_cluster == scheme.endswith("cluster")


def test_users_example_fields():
    u = parse_remote_url("redis://10.0.0.1:6379")
    assert u == RemoteURL("redis", nodes=(("10.0.0.1", 6379),))
    assert not u.is_cluster and not u.uses_tls
    assert str(u) == "redis://10.0.0.1:6379"


def test_tls_options():
    u = parse_remote_url("rediss://u:pw@h:6380/1?ssl_ca_certs=/etc/ca%20dir/ca.pem&ssl_certfile=/c.pem"
                         "&ssl_keyfile=/k.pem&ssl_cert_reqs=OPTIONAL&ssl_check_hostname=false")
    assert u.uses_tls and u.db == 1
    assert u.tls == TLSOptions("/etc/ca dir/ca.pem", "/c.pem", "/k.pem", "optional", False)
    kw = u.redis_kwargs()
    assert kw["ssl"] is True and kw["ssl_cert_reqs"] == "optional" and kw["ssl_check_hostname"] is False
    assert parse_remote_url("rediss://h").tls == TLSOptions()
    c = parse_remote_url("rediss-cluster://a:1,b:2?ssl_cert_reqs=none")
    assert c.is_cluster and c.tls.cert_reqs == "none" and "host" not in c.redis_kwargs()


@pytest.mark.parametrize("url, path, db, password", [
    pytest.param("unix:///run/redis.sock", "/run/redis.sock", 0, None, id="plain"),
    pytest.param("unix://:pw@/run/redis.sock?db=2", "/run/redis.sock", 2, "pw", id="password-db"),
    pytest.param("unix:///tmp/a%20b.sock", "/tmp/a b.sock", 0, None, id="percent-path"),
])
def test_unix_urls(url, path, db, password):
    u = parse_remote_url(url)
    assert (u.scheme, u.unix_path, u.db, u.password, u.nodes) == ("unix", path, db, password, ())


@pytest.mark.parametrize("url, message", [
    pytest.param("", "no scheme", id="empty"),
    pytest.param("10.0.0.1:6379", "no scheme", id="no-scheme"),
    pytest.param("http://h:1", "unknown scheme 'http'", id="unknown-scheme"),
    pytest.param("Redis://h", "did you mean 'redis'", id="scheme-case"),
    pytest.param("redis://", "no host", id="nothing"),
    pytest.param("redis://:pw@", "no host", id="only-password"),
    pytest.param("redis://:6379", "no host", id="only-port"),
    pytest.param("redis://h:0", "1..65535", id="port-0"),
    pytest.param("redis://h:65536", "1..65535", id="port-too-big"),
    pytest.param("redis://h:99999999999999999999", "1..65535", id="port-huge"),
    pytest.param("redis://h:abc", "1..65535", id="port-text"),
    pytest.param("redis://h:", "1..65535", id="port-empty"),
    pytest.param("redis://h:-1", "1..65535", id="port-negative"),
    pytest.param("redis-cluster://a:1/2", "only db 0", id="cluster-db-path"),
    pytest.param("redis-cluster://a:1?db=1", "only db 0", id="cluster-db-query"),
    pytest.param("redis-cluster://a:1,,b:2", "node #2 .* empty", id="cluster-empty-node"),
    pytest.param("redis-cluster://a:1,", "node #2 .* empty", id="cluster-trailing-comma"),
    pytest.param("redis-cluster://a:1,a:1", "listed twice", id="cluster-duplicate"),
    pytest.param("redis://a:1,b:2", "cluster scheme", id="two-hosts-not-cluster"),
    pytest.param("redis://::1:6379", "brackets", id="ipv6-unbracketed"),
    pytest.param("redis://[::1:6379", "without ']'", id="ipv6-open-bracket"),
    pytest.param("redis://[not-v6]:1", "not an IPv6", id="ipv6-bad"),
    pytest.param("redis://[::1]x", "unexpected", id="ipv6-junk-after"),
    pytest.param("redis://999.1.1.1", "not a valid IPv4", id="ipv4-bad"),
    pytest.param("redis://ba!d", "not a valid host", id="host-chars"),
    pytest.param("redis://-h", "not a valid host", id="host-leading-dash"),
    pytest.param("redis://a..b", "not a valid host", id="host-empty-label"),
    pytest.param("unix://relative.sock", "must be absolute", id="unix-relative"),
    pytest.param("unix://", "absolute socket path", id="unix-no-path"),
    pytest.param("redis://h?ssl_ca_certs=/x", "needs rediss", id="tls-option-plain"),
    pytest.param("rediss://h?ssl_cert_reqs=maybe", "ssl_cert_reqs", id="cert-reqs-bad"),
    pytest.param("rediss://h?ssl_check_hostname=perhaps", "true or false", id="check-hostname-bad"),
    pytest.param("rediss://h?ssl_ca_cert=/x", "did you mean 'ssl_ca_certs'", id="tls-typo"),
    pytest.param("redis://h?socket_timeout=1", "unknown query option", id="unknown-option"),
    pytest.param("redis://h?db", "not key=value", id="query-no-equals"),
    pytest.param("redis://h?db=1&db=1", "twice", id="query-duplicate"),
    pytest.param("redis://h/abc", "db number", id="path-not-db"),
    pytest.param("redis://h/1/2", "db number", id="path-two-parts"),
    pytest.param("redis://h?db=x", "non-negative integer", id="db-text"),
    pytest.param("redis://h/1?db=2", "twice and differently", id="db-conflict"),
    pytest.param("redis://h#frag", "fragment", id="fragment"),
    pytest.param("redis://h h", "contains ' '", id="space"),
    pytest.param("redis://u:%zz@h", "%XX", id="bad-percent"),
    pytest.param("redis://u:%ff@h", "UTF-8", id="bad-utf8"),
])
def test_malformed_urls_are_config_errors(url, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_remote_url(url)
    assert isinstance(info.value, ValueError) and isinstance(info.value, LMCacheError)


@pytest.mark.parametrize("value", [None, 6379, b"redis://h"], ids=["none", "int", "bytes"])
def test_non_string_is_config_error(value):
    with pytest.raises(ConfigError, match="expected a string"):
        parse_remote_url(value)


@pytest.mark.parametrize("url", [
    "redis://u:hunter2@h:0", "redis://:hunter2@", "redis://:hunter2@h h", "redis://:hunter2@h/x",
    "redis-cluster://:hunter2@a,,b", "http://:hunter2@h", "unix://:hunter2@rel", "redis://:hunter2@h#x",
    ":hunter2@h", "redis://:hunter2@[::1",
])
def test_password_never_in_error_message(url):
    with pytest.raises(ConfigError) as info:
        parse_remote_url(url)
    assert "hunter2" not in str(info.value)


def test_password_masked_in_repr_and_str():
    u = parse_remote_url("rediss://admin:hunter2@h:1")
    assert "hunter2" not in repr(u) and "hunter2" not in str(u) and "***" in repr(u)
    assert "hunter2" in u.to_url(show_password=True) and u.redis_kwargs()["password"] == "hunter2"


@pytest.mark.parametrize("url", [
    "redis://10.0.0.1:6379", "redis://localhost", "redis://h:7000/3", "redis://h?db=2", "redis://u:p%40w@h:1/2",
    "redis://:pw@h", "redis://[::1]:6380/1", "rediss://h:6380?ssl_cert_reqs=none&ssl_ca_certs=/c%20a.pem",
    "rediss://h?ssl_check_hostname=false", "unix:///run/redis.sock", "unix://:pw@/run/r.sock?db=3",
])
def test_agrees_with_redis_py_from_url(url):
    theirs = redis.connection.parse_url(url)
    ours = parse_remote_url(url).redis_kwargs()
    if "path" in theirs:
        theirs["unix_socket_path"] = theirs.pop("path")
    theirs.setdefault("db", 0)
    if "host" in theirs:
        theirs.setdefault("port", 6379)
    if getattr(theirs.pop("connection_class", None), "__name__", "") == "SSLConnection":
        theirs["ssl"] = True
    assert ours == theirs


# ---- property tests ----

_label = st.from_regex(r"[a-z0-9_]([a-z0-9_-]{0,8}[a-z0-9_])?", fullmatch=True)
_dns = st.lists(_label, min_size=1, max_size=4).map(".".join).filter(
    lambda h: not all(p.isdigit() for p in h.split(".")))
_host = st.one_of(_dns, st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))
_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)
_node = st.tuples(_host, st.integers(1, 65535))


@st.composite
def remote_urls(draw) -> RemoteURL:
    scheme = draw(st.sampled_from(sorted(SCHEMES)))
    uses_tls, cluster = SCHEMES[scheme]
    tls = None
    if uses_tls:
        tls = TLSOptions(*(draw(st.none() | _text) for _ in range(3)),
                         draw(st.none() | st.sampled_from(["none", "optional", "required"])),
                         draw(st.none() | st.booleans()))
    auth = dict(username=draw(st.none() | _text), password=draw(st.none() | _text))
    if scheme == "unix":
        path = "/" + draw(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")))
        return RemoteURL(scheme, unix_path=path, db=draw(st.integers(0, 99)), **auth)
    nodes = draw(st.lists(_node, min_size=1, max_size=4 if cluster else 1, unique=True))
    db = 0 if cluster else draw(st.integers(0, 99))
    return RemoteURL(scheme, nodes=tuple(nodes), db=db, tls=tls, **auth)


@settings(max_examples=300, deadline=None)
@given(remote_urls())
def test_round_trip(u):
    text = u.to_url(show_password=True)
    assert parse_remote_url(text) == u
    if u.password is not None:
        assert "password='***'" in repr(u)


_urlish = st.text(alphabet="redisunxcluter:/@[]%,?=&#.0123456789abcdef-_ +:", max_size=40)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=60),
                 st.tuples(st.sampled_from([f"{s}://" for s in SCHEMES]), _urlish).map("".join)))
def test_arbitrary_text_parses_or_raises_config_error_only(text):
    try:
        u = parse_remote_url(text)
    except ConfigError:
        return
    assert parse_remote_url(u.to_url(show_password=True)) == u  # whatever is accepted is stable
    for host, port in u.nodes:
        assert 1 <= port <= 65535 and host
        if ":" in host:
            ipaddress.IPv6Address(host)
