"""Coverage-guided fuzzing (atheris / libFuzzer) of the configuration loader: CacheConfig.from_file on
arbitrary YAML text and CacheConfig.load on arbitrary environment dicts. Only ConfigError may escape;
cache_secret never shows in repr() or in an error; no YAML tag runs code.

Run (from the repository root):

    .venv/bin/python fuzz/fuzz_config.py -max_total_time=3600 -dict=fuzz/config.dict fuzz/corpus/config

libFuzzer flags apply; crashes are written as crash-* files and replay with
`python fuzz/fuzz_config.py crash-<id>`.
"""

import os
import sys

import atheris

with atheris.instrument_imports(include=["lmcache_core", "yaml"]):
    from lmcache_core.config import ENV_VARS, KEYS, CacheConfig
    from lmcache_core.errors import ConfigError

SECRET = "Fz-secret-7c1d"
ENV_NAMES = sorted(set(ENV_VARS) - {"LMCACHE_CONFIG_FILE"})
KEY_NAMES = [k.name for k in KEYS] + ["cache_config", "performance"]
# The YAML goes to an anonymous in-memory file, opened by path: nothing is left behind when libFuzzer exits
# (it ends the process without running Python's clean-up).
FD = os.memfd_create("lmcache-fuzz-config")
PATH = f"/proc/self/fd/{FD}"


def _check(make) -> None:
    try:
        cfg = make()
    except ConfigError as e:
        assert SECRET not in str(e), f"cache_secret in an error: {e}"
        return
    assert isinstance(cfg, CacheConfig) and SECRET not in repr(cfg)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode == 0:  # raw YAML text
        text = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
    elif mode == 1:  # lines `key: value` over the real keys, values as the fuzzer writes them
        lines = []
        for _ in range(fdp.ConsumeIntInRange(0, 6)):
            key = fdp.PickValueInList(KEY_NAMES)
            value = SECRET if key == "cache_secret" and fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(24)
            lines.append(f"{'  ' if fdp.ConsumeBool() else ''}{key}: {value}")
        text = "\n".join(lines)
    else:  # environment variables
        env = {}
        for _ in range(fdp.ConsumeIntInRange(0, 6)):
            if fdp.ConsumeBool():
                name = fdp.PickValueInList(ENV_NAMES)
            else:
                name = "LMCACHE_" + fdp.ConsumeUnicodeNoSurrogates(8)
            env[name] = fdp.ConsumeUnicodeNoSurrogates(32)
        if fdp.ConsumeBool():
            env["LMCACHE_CACHE_SECRET"] = SECRET + ("\x01" if fdp.ConsumeBool() else "")
        env.pop("LMCACHE_CONFIG_FILE", None)
        _check(lambda: CacheConfig.load(env=env))
        return
    os.ftruncate(FD, 0)
    os.pwrite(FD, text.encode("utf-8"), 0)
    _check(lambda: CacheConfig.from_file(PATH))


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
