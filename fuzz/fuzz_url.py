"""Coverage-guided fuzzing (atheris / libFuzzer) of the Redis URL parser, lmcache_core.remote_url.
parse_remote_url. Only ConfigError may escape; the password never shows in str() or repr(), nor the
fuzzer's password text in an error; a URL that parses round-trips through to_url(show_password=True).

Inputs are raw text, or URLs assembled from fuzzer-chosen pieces (scheme, user info, hosts, ports, path,
query), which reaches the later checks far sooner. Run (from the repository root):

    .venv/bin/python fuzz/fuzz_url.py -max_total_time=3600 fuzz/corpus/url

libFuzzer flags apply; crashes replay with `python fuzz/fuzz_url.py crash-<id>`.
"""

import sys

import atheris

with atheris.instrument_imports(include=["lmcache_core"]):
    from lmcache_core.errors import ConfigError
    from lmcache_core.remote_url import parse_remote_url

PASSWORD = "Pw-3b9a"
SCHEMES = ["redis", "rediss", "unix", "redis-cluster", "rediss-cluster"]
HOSTS = ["127.0.0.1", "localhost", "[::1]", "::1", "h.example", "[fe80::1]", "1.2.3", "a..b", ""]
QUERY = ["db", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname", "x"]


def _assembled(fdp: atheris.FuzzedDataProvider) -> str:
    scheme = fdp.PickValueInList(SCHEMES) if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(8)
    user = fdp.ConsumeUnicodeNoSurrogates(6) if fdp.ConsumeBool() else ""
    auth = f"{user}:{PASSWORD}{fdp.ConsumeUnicodeNoSurrogates(3)}@" if fdp.ConsumeBool() else ""
    nodes = []
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        host = fdp.PickValueInList(HOSTS) if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(10)
        port = f":{fdp.ConsumeIntInRange(0, 70000)}" if fdp.ConsumeBool() else ""
        nodes.append(host + port)
    path = fdp.PickValueInList(["", "/", "/0", "/7", "/x", "/run/redis.sock"])
    query = "&".join(f"{fdp.PickValueInList(QUERY)}={fdp.ConsumeUnicodeNoSurrogates(8)}"
                     for _ in range(fdp.ConsumeIntInRange(0, 3)))
    return f"{scheme}://{auth}{','.join(nodes)}{path}" + (f"?{query}" if query else "")


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    url = _assembled(fdp) if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
    try:
        u = parse_remote_url(url)
    except ConfigError as e:
        assert PASSWORD not in str(e), f"password in an error: {e}"
        return
    if u.password is not None and len(u.password) >= 4:  # shorter ones may match other text by chance
        assert u.password not in str(u) and u.password not in repr(u), url
    assert parse_remote_url(u.to_url(show_password=True)) == u, url
    u.redis_kwargs()


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
