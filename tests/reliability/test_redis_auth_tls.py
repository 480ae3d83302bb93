"""CacheEngine round trips over an authenticated and an encrypted Redis: one engine stores, another (a fresh
instance, nothing in memory) retrieves byte-exact.

- AUTH: a server with requirepass (`redis://:password@`), and an ACL user limited to the `lmc:*` key space
  (`redis://user:password@`). A wrong password, no password, or an ACL user without rights on our keys gets
  misses, counted as `auth` errors, and never an exception.
- TLS: a throwaway CA (openssl, in the test) signs a server certificate for 127.0.0.1 and a client
  certificate; the server has no plaintext port, requires client certificates and a password. Engines use
  `rediss://:password@127.0.0.1:port?ssl_ca_certs=...&ssl_certfile=...&ssl_keyfile=...&ssl_cert_reqs=required
  &ssl_check_hostname=true`. Without the client certificate, trusting only the system CAs, or speaking
  plaintext to the TLS port: misses within the timeout, no exception.
tests/lmcache_core/test_redis_faults.py covers the tier alone with a password, an ACL user and server-only TLS.
"""

import shutil
import subprocess
import time

import pytest
import redis

from tests.redis_servers import LOOPBACK, _die_with_parent, free_port
from tests.reliability.common import CS, engine, kv_for, same_bytes, tokens

TIMEOUT_S = 0.5
PASSWORD = "pw-Lm9#%x"  # '#' and '%' need percent-encoding in the URL: tested with it
PASSWORD_URL = "pw-Lm9%23%25x"


def _round_trip(url: str, seed: int, **cfg) -> None:
    toks, kv = tokens(3 * CS, seed=seed), kv_for(3 * CS, seed=seed)
    writer = engine(l2_chunks=1, remote_url=url, remote_timeout=TIMEOUT_S, **cfg)
    assert writer.store(toks, kv) == 3 * CS
    writer.flush()
    writer.close()
    reader = engine(l2_chunks=1, remote_url=url, remote_timeout=TIMEOUT_S, **cfg)
    try:
        n, out = reader.retrieve(toks)
        assert n == 3 * CS and same_bytes(out, kv), f"round trip over {reader.config.remote_url} failed"
        assert reader.stats()["L4"]["hits"] == 3 and not reader.stats()["L4"]["errors"]
    finally:
        reader.close()


def _refused(url: str, seed: int, kind: str) -> dict:
    """Store and retrieve through `url`, which the server must refuse: no exception, misses, bounded time."""
    toks, kv = tokens(3 * CS, seed=seed), kv_for(3 * CS, seed=seed)
    e = engine(l2_chunks=1, remote_url=url, remote_timeout=TIMEOUT_S)
    try:
        t0 = time.monotonic()
        e.store(toks, kv)
        e.flush()
        e.tiers.memory[0].clear()
        assert e.retrieve(toks) == (0, None)
        assert time.monotonic() - t0 < 4 * TIMEOUT_S + 1.0
        errors = dict(e.stats()["L4"]["errors"])
        assert errors.get(kind, 0) >= 1, (url, errors)
        return errors
    finally:
        e.close()


@pytest.mark.parametrize("redis_node", [{"password": PASSWORD}], indirect=True)
def test_password_and_acl_user(redis_node):
    hostport = f"{redis_node.host}:{redis_node.port}"
    _round_trip(f"redis://:{PASSWORD_URL}@{hostport}", seed=1)
    admin = redis_node.client()
    admin.acl_setuser("lmc-tenant", enabled=True, passwords=["+tenant-pw"], keys=["lmc:*"],
                      commands=["+@all", "-info", "-@admin", "-flushall", "-flushdb"])
    admin.acl_setuser("not-ours", enabled=True, passwords=["+other-pw"], keys=["other:*"], commands=["+@all"])
    _round_trip(f"redis://lmc-tenant:tenant-pw@{hostport}", seed=2)
    assert admin.keys("lmc:*"), "the ACL user wrote our keys"
    _refused(f"redis://:wrong@{hostport}", seed=3, kind="auth")
    _refused(f"redis://{hostport}", seed=4, kind="auth")
    _refused(f"redis://lmc-tenant:wrong@{hostport}", seed=5, kind="auth")
    _refused(f"redis://not-ours:other-pw@{hostport}", seed=6, kind="auth")  # NOPERM on lmc:* keys
    admin.close()


@pytest.fixture
def tls_server(redis_binaries, tmp_path):
    """A redis-server on a TLS port only, requiring client certificates and a password."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI to make a throwaway CA")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", "/CN=lmcache-test-ca")
    (tmp_path / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    (tmp_path / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for who, subject in (("server", "/CN=127.0.0.1"), ("client", "/CN=lmcache-client")):
        openssl("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", subject)
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{who}.crt", "-days", "1", "-extfile", f"{who}.ext")
    port = free_port()
    args = [redis_binaries.server, "--port", "0", "--tls-port", str(port), "--bind", LOOPBACK,
            "--tls-cert-file", str(tmp_path / "server.crt"), "--tls-key-file", str(tmp_path / "server.key"),
            "--tls-ca-cert-file", str(tmp_path / "ca.crt"), "--tls-auth-clients", "yes",
            "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
            "--logfile", str(tmp_path / "redis.log")]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent)  # noqa: PLW1509 - as tests/redis_servers.py: dies with us
    files = {n: str(tmp_path / n) for n in ("ca.crt", "client.crt", "client.key")}
    probe = redis.Redis(host=LOOPBACK, port=port, password=PASSWORD, ssl=True, ssl_ca_certs=files["ca.crt"],
                        ssl_certfile=files["client.crt"], ssl_keyfile=files["client.key"], socket_timeout=1,
                        socket_connect_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            if probe.ping():
                break
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            pass
        log = (tmp_path / "redis.log").read_text(errors="replace") if (tmp_path / "redis.log").exists() else ""
        if proc.poll() is not None:
            pytest.skip(f"this redis-server cannot serve TLS: {log[-500:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"TLS redis-server not ready:\n{log[-2000:]}")
        time.sleep(0.05)
    yield port, files, probe
    probe.close()
    proc.kill()
    proc.wait()


def test_mutual_tls_with_password(tls_server):
    port, f, probe = tls_server
    tls = f"ssl_ca_certs={f['ca.crt']}&ssl_cert_reqs=required"
    client_cert = f"ssl_certfile={f['client.crt']}&ssl_keyfile={f['client.key']}"
    good = f"rediss://:{PASSWORD_URL}@{LOOPBACK}:{port}?{tls}&{client_cert}&ssl_check_hostname=true"
    _round_trip(good, seed=11)
    assert probe.keys("lmc:*"), "chunks went through the TLS server"
    _refused(f"rediss://:{PASSWORD_URL}@{LOOPBACK}:{port}?{tls}", seed=12, kind="connection")  # no client cert
    _refused(f"rediss://:{PASSWORD_URL}@{LOOPBACK}:{port}?ssl_cert_reqs=required&{client_cert}", seed=13,
             kind="connection")  # our CA not trusted: system CAs only
    _refused(f"redis://:{PASSWORD_URL}@{LOOPBACK}:{port}", seed=14, kind="connection")  # plaintext to TLS
    _refused(f"rediss://:wrong@{LOOPBACK}:{port}?{tls}&{client_cert}", seed=15, kind="auth")
