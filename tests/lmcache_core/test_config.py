"""CacheConfig: the users' YAML as written, sizes, precedence, and errors that name key, source and fix."""

import dataclasses
import re

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from lmcache_core.config import KEYS, ByteSize, CacheConfig, keys_markdown
from lmcache_core.errors import ConfigError, LMCacheError
from lmcache_core.remote_url import BOOL_WORDS, RemoteURL, parse_remote_url

GB, GiB, MiB = 10**9, 2**30, 2**20

USERS_YAML = """\
cache_config:
  max_gpu_cache_ratio: 0.3
  hot_cache_ttl: 3600
  local_cache_dir: "/lmcache"
  max_local_cache_size: 50          # GB
  remote_url: "redis://10.0.0.1:6379"
  remote_ttl: 604800
performance:
  prefetch_enabled: true
  compression_enabled: true
  batch_size: 32
"""

# one valid, non-default value per key, as an environment variable would spell it
SAMPLES = {
    "chunk_size": ("512", 512), "segment_reuse": ("true", True), "segment_separator": ("ids:13,198", "ids:13,198"), "max_gpu_cache_ratio": ("0.25", 0.25),
    "max_device_cache_size": ("2GiB", 2 * GiB), "max_local_cpu_size": ("1.5", 1_500_000_000),
    "hot_hit_threshold": ("0", 0), "hot_cache_ttl": ("60", 60.0), "max_hot_ratio": ("0.2", 0.2),
    "write_policy": ("write_through", "write_through"), "local_cache_dir": ("/var/cache/lm", "/var/cache/lm"),
    "max_local_cache_size": ("512MB", 512 * 10**6), "disk_fsync": ("always", "always"),
    "disk_ttl": ("86400", 86400.0),
    "remote_url": ("redis-cluster://a:1,b:2", RemoteURL("redis-cluster", (("a", 1), ("b", 2)))),
    "remote_ttl": ("0", 0.0), "remote_timeout": ("0.5", 0.5), "remote_max_part_size": ("1048576", MiB),
    "lock_timeout": ("2.5", 2.5), "fallback_on_timeout": ("no", False), "cache_salt": ("tenant-a", "tenant-a"),
    "cache_secret": ("s3cr3t-value", "s3cr3t-value"), "metrics_port": ("9100", 9100),
    "prefetch_enabled": ("false", False), "compression_enabled": ("0", False), "codec": ("none", "none"),
    "compression_level": ("-3", -3), "compression_min_ratio": ("1.5", 1.5), "batch_size": ("8", 8),
    "host_memory_headroom": ("4GiB", 4 * GiB), "device_memory_headroom": ("512MiB", 512 * MiB),
    "async_load": ("false", False), "layerwise": ("on", "on"), "lookup_timeout": ("0.25", 0.25),
    "pinned_prompts": ('["You are a helpful bot.\\n", "ids:1,2,3"]', ("You are a helpful bot.\n", "ids:1,2,3")),
}


def write(tmp_path, text, name="lmcache_config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_valid():
    c = CacheConfig()
    assert c.chunk_size == 256 and c.codec == "zstd" and c.effective_codec == "zstd"
    assert c.local_cache_dir is None and c.remote_url is None and c.metrics_port is None
    assert isinstance(c.max_local_cpu_size, ByteSize) and c.max_local_cpu_size == 5 * GB


def test_users_yaml_as_written(tmp_path):
    c = CacheConfig.from_file(write(tmp_path, USERS_YAML))
    assert c.max_gpu_cache_ratio == 0.3 and c.hot_cache_ttl == 3600 and c.remote_ttl == 604800
    assert c.local_cache_dir == "/lmcache" and c.max_local_cache_size == 50 * GB
    assert c.remote_url == RemoteURL("redis", nodes=(("10.0.0.1", 6379),))  # parsed, never connected
    assert c.prefetch_enabled is True and c.compression_enabled is True and c.batch_size == 32


def test_flat_keys_equal_sections(tmp_path):
    flat = "\n".join(line.strip() for line in USERS_YAML.splitlines() if line.startswith("  "))
    assert CacheConfig.from_file(write(tmp_path, flat)) == CacheConfig.from_file(write(tmp_path, USERS_YAML, "b.yaml"))


def test_empty_file_is_defaults(tmp_path):
    assert CacheConfig.from_file(write(tmp_path, "# nothing\n")) == CacheConfig()
    assert CacheConfig.from_file(write(tmp_path, "cache_config:\nperformance:\n")) == CacheConfig()


@pytest.mark.parametrize("value, expected", [
    (50, 50 * GB), (0.5, GB // 2), (0, 0), ("512MB", 512 * 10**6), ("2GiB", 2 * GiB), ("50GB", 50 * GB),
    ("1.5GiB", 3 * GiB // 2), ("4096B", 4096), (" 10 gb ", 10 * GB), ("7", 7 * GB), ("1TiB", 2**40),
    (ByteSize(123), 123),
], ids=str)
def test_sizes(value, expected):
    c = CacheConfig(max_local_cpu_size=value)
    assert c.max_local_cpu_size == expected and isinstance(c.max_local_cpu_size, ByteSize)


@pytest.mark.parametrize("value", [-1, "-1GB", "12 parsecs", "GB", "1e3GB", "", True, [1], float("nan"),
                                   float("inf"), "5 G"], ids=repr)
def test_bad_sizes(value):
    with pytest.raises(ConfigError, match=r"max_local_cpu_size: expected a size like 50, 512MB or 2GiB"):
        CacheConfig(max_local_cpu_size=value)


def test_part_size_plain_number_is_bytes():
    assert CacheConfig(remote_max_part_size=MiB).remote_max_part_size == MiB
    assert CacheConfig(remote_max_part_size="64MiB").remote_max_part_size == 64 * MiB
    with pytest.raises(ConfigError, match=r"remote_max_part_size: .* in 1MiB\.\.512MiB, got 1000 \(int\)"):
        CacheConfig(remote_max_part_size=1000)


@given(st.integers(0, 10**15))
def test_byte_size_text_round_trips(n):
    key = next(k for k in KEYS if k.name == "max_local_cpu_size")
    assert key.from_text(str(ByteSize(n)), "test") == n
    assert key.from_text(f"{n}B", "test") == n


def test_replace_keeps_sizes_and_url():
    c = CacheConfig(max_local_cpu_size="3GiB", remote_url="redis://:pw@h:1")
    d = dataclasses.replace(c, chunk_size=512)
    assert d.max_local_cpu_size == 3 * GiB and d.remote_url == c.remote_url and d.chunk_size == 512


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CacheConfig().chunk_size = 1


def test_precedence_defaults_file_env_overrides(tmp_path):
    path = write(tmp_path, "chunk_size: 512\nbatch_size: 8\ncodec: none\ncache_salt: from-file\n")
    env = {"LMCACHE_BATCH_SIZE": "16", "LMCACHE_CODEC": "int8", "PATH": "/bin"}
    c = CacheConfig.load(file=path, env=env, overrides={"codec": "fp8"})
    assert c.chunk_size == 512  # file over default
    assert c.batch_size == 16  # env over file
    assert c.codec == "fp8"  # overrides over env over file
    assert c.cache_salt == "from-file" and c.lock_timeout == 10.0  # untouched keys: file, default


def test_config_file_from_env_and_argument_wins(tmp_path):
    a = write(tmp_path, "chunk_size: 512\n", "a.yaml")
    b = write(tmp_path, "chunk_size: 1024\n", "b.yaml")
    env = {"LMCACHE_CONFIG_FILE": str(a)}
    assert CacheConfig.load(env=env).chunk_size == 512
    assert CacheConfig.from_env(env).chunk_size == 512
    assert CacheConfig.load(file=b, env=env).chunk_size == 1024
    assert CacheConfig.from_file(a) == CacheConfig.load(file=a, env={})


def test_load_reads_os_environ_by_default(monkeypatch):
    for var in [v for v in __import__("os").environ if v.startswith("LMCACHE_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "128")
    monkeypatch.setenv("LMCACHE_KERNEL_BACKEND", "torch")  # read by kernels/, ignored here
    assert CacheConfig.load().chunk_size == 128 and CacheConfig.from_env().chunk_size == 128


def test_overrides_accept_sections_like_the_file():
    c = CacheConfig.load(env={}, overrides={"performance": {"batch_size": 4}, "chunk_size": 64})
    assert (c.batch_size, c.chunk_size) == (4, 64)


def test_every_key_has_a_sample():
    assert set(SAMPLES) == {k.name for k in KEYS}, "add a sample for the new key"


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_key_settable_from_env_file_and_overrides(name, tmp_path):
    text, expected = SAMPLES[name]
    key = next(k for k in KEYS if k.name == name)
    from_env = CacheConfig.load(env={"LMCACHE_" + name.upper(): text})
    assert getattr(from_env, name) == expected
    as_yaml = text if key.kind in ("str", "path", "url", "size", "choice") else (
        list(expected) if isinstance(expected, tuple) else expected)
    from_file = CacheConfig.from_file(write(tmp_path, yaml.safe_dump({name: as_yaml})))
    from_overrides = CacheConfig.load(env={}, overrides={name: getattr(from_env, name)})
    assert from_file == from_env == from_overrides


def test_bytes_given_where_gb_are_meant_is_caught():
    with pytest.raises(ConfigError, match=r"a plain number here is GB, for bytes write '2147483648B'"):
        CacheConfig.load(env={}, overrides={"max_local_cpu_size": 2147483648})
    with pytest.raises(ConfigError, match=r"env LMCACHE_MAX_LOCAL_CPU_SIZE: .*for bytes write '2147483648B'"):
        CacheConfig.from_env({"LMCACHE_MAX_LOCAL_CPU_SIZE": "2147483648"})
    assert CacheConfig(max_local_cpu_size="2000000GB").max_local_cpu_size == 2 * 10**15  # a unit is explicit


def test_local_disk_size_alias_and_remote_url_env():
    c = CacheConfig.from_env({"LMCACHE_LOCAL_DISK_SIZE": "20", "LMCACHE_REMOTE_URL": "redis://10.0.0.1:6379"})
    assert c.max_local_cache_size == 20 * GB and c.remote_url.nodes == (("10.0.0.1", 6379),)
    with pytest.raises(ConfigError, match="LMCACHE_LOCAL_DISK_SIZE and LMCACHE_MAX_LOCAL_CACHE_SIZE both set"):
        CacheConfig.from_env({"LMCACHE_LOCAL_DISK_SIZE": "20", "LMCACHE_MAX_LOCAL_CACHE_SIZE": "20"})


@pytest.mark.parametrize("text, expected", [("true", True), ("TRUE", True), ("1", True), ("yes", True),
                                            ("false", False), ("0", False), ("No", False)])
def test_env_bools(text, expected):
    assert CacheConfig.from_env({"LMCACHE_PREFETCH_ENABLED": text}).prefetch_enabled is expected


@pytest.mark.parametrize("word", ["true", "1", "yes", "false", "0", "no", "maybe", "on"])
def test_config_and_url_accept_the_same_boolean_words(word):
    """One table (remote_url.BOOL_WORDS) for env booleans and the URL's ssl_check_hostname."""
    def parse(fn):
        try:
            return fn()
        except ConfigError:
            return "refused"

    from_env = parse(lambda: CacheConfig.from_env({"LMCACHE_PREFETCH_ENABLED": word.upper()}).prefetch_enabled)
    from_url = parse(lambda: parse_remote_url(f"rediss://h?ssl_check_hostname={word}").tls.check_hostname)
    assert from_env == from_url == BOOL_WORDS.get(word, "refused")


@pytest.mark.parametrize("text", ["maybe", "2", "", "on"])
def test_env_bad_bool(text):
    with pytest.raises(ConfigError, match=r"env LMCACHE_PREFETCH_ENABLED: prefetch_enabled: expected true or false"):
        CacheConfig.from_env({"LMCACHE_PREFETCH_ENABLED": text})


@pytest.mark.parametrize("var, text, match", [
    ("LMCACHE_BATCH_SIZE", "abc", r"env LMCACHE_BATCH_SIZE: batch_size: expected an integer in 1\.\.4096, got 'abc'"),
    ("LMCACHE_BATCH_SIZE", "3.5", r"env LMCACHE_BATCH_SIZE: batch_size: expected an integer"),
    ("LMCACHE_LOCK_TIMEOUT", "soon", r"env LMCACHE_LOCK_TIMEOUT: lock_timeout: expected a number of seconds"),
    ("LMCACHE_REMOTE_TIMEOUT", "nan", r"remote_timeout: expected a number of seconds > 0"),
    ("LMCACHE_REMOTE_TIMEOUT", "0", r"remote_timeout: expected a number of seconds > 0, got 0.0"),
    ("LMCACHE_REMOTE_URL", "redis://h:70000", r"env LMCACHE_REMOTE_URL: remote_url: .*1\.\.65535"),
    ("LMCACHE_CHUNKSIZE", "256", r"unknown variable LMCACHE_CHUNKSIZE; did you mean 'LMCACHE_CHUNK_SIZE'"),
    ("LMCACHE_USE_EXPERIMENTAL", "True", r"unknown variable LMCACHE_USE_EXPERIMENTAL"),
])
def test_env_errors(var, text, match):
    with pytest.raises(ConfigError, match=match):
        CacheConfig.from_env({var: text})


def test_env_empty_means_unset_for_optional_keys():
    env = {"LMCACHE_REMOTE_URL": "", "LMCACHE_METRICS_PORT": "none", "LMCACHE_LOCAL_CACHE_DIR": "null"}
    c = CacheConfig.from_env(env)
    assert c.remote_url is None and c.metrics_port is None and c.local_cache_dir is None


@pytest.mark.parametrize("text, match", [
    ("chunk_sise: 256\n", r"lmcache_config.yaml: unknown key 'chunk_sise'; did you mean 'chunk_size'\?"),
    ("cache_config:\n  remote_tll: 5\n",
     r"lmcache_config.yaml \[cache_config\]: unknown key 'remote_tll'; did you mean 'remote_ttl'"),
    ("performace:\n  batch_size: 3\n", r"unknown key 'performace'; did you mean 'performance'"),
    ("batch_size: '32'\n", r"lmcache_config.yaml: batch_size: expected an integer in 1\.\.4096, got '32' \(str\)"),
    ("performance:\n  batch_size: 32.5\n", r"\[performance\]: batch_size: expected an integer .*got 32.5 \(float\)"),
    ("chunk_size: 100\n", r"chunk_size: expected an integer in 16\.\.65536, a multiple of 16, got 100"),
    ("chunk_size: 0\n", r"chunk_size: expected an integer in 16\.\.65536"),
    ("max_gpu_cache_ratio: 1.5\n", r"max_gpu_cache_ratio: expected a number in 0\.\.0\.95, got 1.5"),
    ("codec: zstdd\n", r"codec: expected one of zstd, none, int8, fp8, int4, got 'zstdd' \(str\); did you mean 'zstd'"),
    ("write_policy: writeback\n", r"did you mean 'write_back'"),
    ("prefetch_enabled: 'yes'\n", r"prefetch_enabled: expected true or false, got 'yes' \(str\)"),
    ("metrics_port: 70000\n", r"metrics_port: expected an integer in 1\.\.65535, or null, got 70000"),
    ("remote_url: 'redis://h:1,h:2'\n", r"lmcache_config.yaml: remote_url: remote URL: 2 hosts need a cluster scheme"),
    ("chunk_size: 256\nchunk_size: 512\n", r"not valid YAML: .*'chunk_size' appears twice"),
    ("chunk_size: 256\nperformance:\n  chunk_size: 512\n", r"'chunk_size' appears twice"),
    ("cache_config: [1, 2]\n", r"section cache_config: expected a mapping, got list"),
    ("- chunk_size\n", r"expected a mapping of keys .*got list"),
    ("chunk_size: [256\n", r"lmcache_config.yaml: not valid YAML"),
    ("1: 2\n", r"unknown key 1"),
])
def test_file_errors_name_file_key_expected_and_received(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        CacheConfig.from_file(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, LMCacheError)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        CacheConfig.load(file=tmp_path / "absent.yaml", env={})
    with pytest.raises(ConfigError, match="absent.yaml: cannot read"):
        CacheConfig.from_env({"LMCACHE_CONFIG_FILE": str(tmp_path / "absent.yaml")})


@pytest.mark.parametrize("overrides, match", [
    ({"chunksize": 256}, r"overrides: unknown key 'chunksize'; did you mean 'chunk_size'"),
    ({"batch_size": "32"}, r"overrides: batch_size: expected an integer"),
    ({"performance": {"codec": "INT8"}}, r"overrides \[performance\]: codec: expected one of"),
    ({"max_hot_ratio": True}, r"overrides: max_hot_ratio: expected a number in 0\.\.1, got True \(bool\)"),
], ids=str)
def test_override_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        CacheConfig.load(env={}, overrides=overrides)


def test_constructor_errors_name_the_key():
    with pytest.raises(ConfigError, match=
            r"CacheConfig\(\.\.\.\): hot_hit_threshold: expected an integer >= 0, got -1"):
        CacheConfig(hot_hit_threshold=-1)
    with pytest.raises(ConfigError, match=r"max_device_cache_size: expected a size .* > 0, or null, got 0"):
        CacheConfig(max_device_cache_size=0)  # null means "no explicit cap"; 0 would be read as that too


def test_secrets_never_printed(tmp_path):
    c = CacheConfig(cache_secret="hunter2-secret", remote_url="rediss://admin:hunter2-pw@h:1")
    for text in (repr(c), str(c)):
        assert "hunter2" not in text and "cache_secret='***'" in text and "password='***'" in text
    with pytest.raises(ConfigError) as info:
        CacheConfig(cache_secret=12345678)
    assert "12345678" not in str(info.value) and "cache_secret: expected a string" in str(info.value)
    with pytest.raises(ConfigError) as info:
        CacheConfig.from_file(write(tmp_path, "remote_url: 'redis://:hunter2@h:0'\n"))
    assert "hunter2" not in str(info.value)


def test_cross_field_errors_say_where_values_came_from(tmp_path):
    path = write(tmp_path, "performance:\n  compression_enabled: false\n")
    with pytest.raises(ConfigError, match=r"codec is 'int8' \(lossy\) but compression_enabled is false.*"
                                          r"compression_enabled from .*\[performance\].*codec from env LMCACHE_CODEC"):
        CacheConfig.load(file=path, env={"LMCACHE_CODEC": "int8"})
    assert CacheConfig(compression_enabled=False).effective_codec == "none"
    with pytest.raises(ConfigError, match="max_local_cpu_size is 0"):
        CacheConfig(max_local_cpu_size=0, remote_url="redis://h")
    with pytest.raises(ConfigError, match="max_local_cache_size is 0"):
        CacheConfig(local_cache_dir="/x", max_local_cache_size=0)


def test_markdown_table_covers_every_key_once_and_its_defaults_parse_back():
    table = keys_markdown()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [re.match(r"\| `(\w+)`", r).group(1) for r in rows] == [f.name for f in dataclasses.fields(CacheConfig)]
    assert "`LMCACHE_LOCAL_DISK_SIZE`" in table
    for key, row in zip(KEYS, rows):
        shown = row.split(" | ")[3].strip("`")
        if key.default is not None and key.kind != "str":
            assert key.from_text(shown, "table") == key.default, key.name


def test_environment_only_set_up_as_the_deployment_guide_writes_it(monkeypatch, tmp_path):
    """`LMCACHE_LOCAL_DISK_SIZE=128` alone asks for a disk tier: it gets the default directory (not silently
    none); `LMCACHE_REMOTE_URL` alone is Redis without a disk; both, both; a size with an explicit null
    directory is no disk, as written."""
    from lmcache_core.config import default_disk_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_disk_dir() == str(tmp_path / "lmcache-core" / "chunks")
    disk = CacheConfig.from_env({"LMCACHE_LOCAL_DISK_SIZE": "128"})
    assert (disk.local_cache_dir, disk.max_local_cache_size, disk.remote_url) == (default_disk_dir(), 128 * GB, None)
    remote = CacheConfig.from_env({"LMCACHE_REMOTE_URL": "redis://10.0.0.1:6379"})
    assert remote.local_cache_dir is None and remote.remote_url.nodes == (("10.0.0.1", 6379),)
    both = CacheConfig.from_env({"LMCACHE_LOCAL_DISK_SIZE": "128", "LMCACHE_REMOTE_URL": "redis://10.0.0.1:6379"})
    assert both.local_cache_dir == default_disk_dir() and both.remote_url is not None
    off = CacheConfig.load(env={"LMCACHE_LOCAL_DISK_SIZE": "128"}, overrides={"local_cache_dir": None})
    assert off.local_cache_dir is None
    named = CacheConfig.from_env({"LMCACHE_LOCAL_DISK_SIZE": "1", "LMCACHE_LOCAL_CACHE_DIR": str(tmp_path / "x")})
    assert named.local_cache_dir == str(tmp_path / "x")


def test_pinned_prompts_are_checked():
    with pytest.raises(ConfigError, match="pinned_prompts: expected a list of prompts"):
        CacheConfig(pinned_prompts="just one string")
    with pytest.raises(ConfigError, match="item 1: write token ids as ids:13,198"):
        CacheConfig(pinned_prompts=["fine", "ids:1,x"])
    with pytest.raises(ConfigError, match="env LMCACHE_PINNED_PROMPTS: .*write a JSON array of strings"):
        CacheConfig.from_env({"LMCACHE_PINNED_PROMPTS": "not json"})
