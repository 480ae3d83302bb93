"""CacheConfig: every setting of the cache engine, in one frozen dataclass.

Where values come from, lowest precedence first (`CacheConfig.load`):
  1. the defaults below;
  2. a YAML file: the `file` argument, else the path in LMCACHE_CONFIG_FILE;
  3. environment variables: LMCACHE_<KEY> for every key (e.g. LMCACHE_CHUNK_SIZE=512), plus the alias
     LMCACHE_LOCAL_DISK_SIZE for max_local_cache_size;
  4. explicit overrides: a dict, e.g. vLLM's kv_connector_extra_config.
A key set in a higher layer replaces it; nothing merges. `from_file` is layers 1-2 for the given path,
`from_env` is layers 1-3, and `CacheConfig(...)` is defaults plus the arguments.

The YAML may group keys in the sections `cache_config:` and `performance:` or write them at the top level;
the sections are for people only (any key may go in either). Sizes: a plain number is in GB (10^9 bytes)
-- except remote_max_part_size, in bytes -- and a string may carry a unit: "512MB", "2GiB", "50GB", "4096B".
Sizes are stored as `ByteSize` (an int of bytes), which is taken as bytes wherever it is passed back in, so
`dataclasses.replace` keeps them. Unknown keys, wrong types and out-of-range values raise ConfigError
naming the key, where it came from, what was expected and what was received.
"""

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from lmcache_core.config_keys import ENV_PREFIX, GB, MASK, ByteSize, Key, MiB, did_you_mean
from lmcache_core.errors import ConfigError
from lmcache_core.remote_url import RemoteURL

CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
ENV_ALIASES = {"LMCACHE_LOCAL_DISK_SIZE": "max_local_cache_size"}
# LMCACHE_* variables that other parts of the project read (kernels/_env.py); CacheConfig leaves them alone.
FOREIGN_ENV_VARS = ("LMCACHE_KERNEL_BACKEND",)
SECTIONS = ("cache_config", "performance")
def _key(default, kind, meaning, **spec):
    return field(default=default, metadata={"key": dict(kind=kind, meaning=meaning, **spec)})


@dataclass(frozen=True)
class CacheConfig:
    # --- chunks and L1/L2 (memory) ---
    chunk_size: int = _key(
        256, "int", "Tokens per chunk: the unit of hashing, storage and reuse. A multiple of 16, so a chunk "
        "is whole vLLM blocks at the default GPU block size; with larger blocks (vLLM CPU: 128) use a "
        "multiple of the block size.", low=16, high=65536, multiple_of=16)
    max_gpu_cache_ratio: float = _key(
        0.1, "float", "L1: fraction of each GPU's total memory the device tier may use, capped at start-up "
        "at what vLLM left free (minus device_memory_headroom; one warning says so); 0 = no L1 (unless "
        "max_device_cache_size is set).", low=0.0, high=0.95)
    max_device_cache_size: ByteSize | None = _key(
        None, "size", "L1: explicit cap per GPU; when set it replaces max_gpu_cache_ratio. On a CPU device it "
        "is the only way to get a separate L1 (null there: L2 serves), sized per node like L2.",
        optional=True, low=0, low_open=True)
    max_local_cpu_size: ByteSize = _key(
        ByteSize(5 * GB), "size", "L2: size of the pinned CPU arena, the staging ground of every lower "
        "tier, for the whole node: its worker processes (TP x PP ranks of one vLLM instance) share it, "
        "1/W each. Shrunk at start-up (one warning) to what the host has left after vLLM's own reservation. "
        "0 = no L2 (allowed only without L3 and L4).")
    host_memory_headroom: ByteSize = _key(
        ByteSize(2 * 2**30), "size", "Host memory the host tiers (L2, a CPU L1) leave free: at start-up they "
        "are capped at what the OS reports available (after vLLM allocated its KV cache) minus this.")
    device_memory_headroom: ByteSize = _key(
        ByteSize(2 * 2**30), "size", "GPU memory L1 leaves free: at start-up L1 is capped at the device's free "
        "memory (after vLLM allocated its KV cache) minus this.")
    hot_hit_threshold: int = _key(
        3, "int", "Hits after which a chunk becomes hot (not evicted while hot) by itself; 0 = only "
        "chunks stored with pin=True are hot.", low=0)
    hot_cache_ttl: float = _key(
        3600.0, "seconds", "How long a chunk stays hot (not evicted) once it became hot by hits or was "
        "stored with pin=True; then it is an ordinary LRU entry again. 0 = no chunk becomes hot.", low=0)
    max_hot_ratio: float = _key(
        0.5, "float", "Fraction of L1 and of L2 that pinned + hot chunks may take; past it no chunk is "
        "made hot.", low=0.0, high=1.0)
    write_policy: str = _key(
        "write_through", "choice", "write_through: stores land in L1/L2 and are also written (in the "
        "background) to every lower tier, so other processes and instances see them at once; write_back: "
        "stores land in L1/L2 only and move down on eviction.",
        choices=("write_back", "write_through"))
    pinned_prompts: tuple[str, ...] = _key(
        (), "prompts", "vLLM connector: prompts whose chunks are kept hot (not evicted from L1/L2, within "
        "max_hot_ratio, for hot_cache_ttl, renewed by every request that starts with them) as soon as they are "
        "stored: text, tokenized with the model's tokenizer, or token ids \"ids:1,2,3\".")
    # --- L3 (local disk) ---
    local_cache_dir: str | None = _key(
        None, "path", "L3 directory (one file per chunk, *.lmc; ~ expanded); null = no disk tier. When "
        "loading a configuration that sets max_local_cache_size (or LMCACHE_LOCAL_DISK_SIZE) but never names "
        "this key, it is DEFAULT_DISK_DIR (created with mode 0700).", optional=True)
    max_local_cache_size: ByteSize = _key(
        ByteSize(50 * GB), "size", "L3 capacity (LMCACHE_LOCAL_DISK_SIZE is an alias).")
    disk_fsync: str = _key(
        "never", "choice", "never: atomic rename only; a file torn by a power loss fails its checksum and "
        "is a miss. file: fsync each chunk file before its rename (never torn). always: also fsync the "
        "directory after the rename (a returned write survives power loss).",
        choices=("never", "file", "always"))
    disk_ttl: float = _key(0.0, "seconds", "L3 entries older than this are swept; 0 = no sweep.", low=0)
    # --- L4 (Redis) ---
    remote_url: RemoteURL | None = _key(
        None, "url", "L4 Redis server or cluster (redis://, rediss://, unix://, redis-cluster://h:p,..., "
        "rediss-cluster://); parsed at load, never connected to here; null = no Redis tier.", optional=True)
    remote_ttl: float = _key(604800.0, "seconds", "Expiry of L4 entries (7 days); 0 = no expiry.", low=0)
    remote_timeout: float = _key(2.0, "seconds", "Timeout of one Redis operation; past it the "
                                 "operation is a miss.", low=0, low_open=True)
    remote_max_part_size: ByteSize = _key(
        ByteSize(16 * MiB), "size", "Largest Redis value; a bigger chunk is split into parts. At most "
        "Redis's default proto-max-bulk-len (512MiB).", unit=1, low=MiB, high=512 * MiB)
    # --- single-flight ---
    lock_timeout: float = _key(10.0, "seconds", "How long a request waits for another one that is "
                               "computing the same chunk.", low=0)
    fallback_on_timeout: bool = _key(
        True, "bool", "After lock_timeout: true = compute the chunk itself; false = keep asking again "
        "until the chunk is stored or the holder's lock expires.")
    # --- namespace, security, metrics ---
    cache_salt: str = _key("", "str", "Namespace mixed into every chunk key: instances with different "
                           "salts never share entries.")
    cache_secret: str | None = _key(
        None, "str", "Key for an HMAC over stored chunks in shared tiers, so entries written without it "
        "are rejected; never printed.", optional=True, secret=True)
    metrics_port: int | None = _key(None, "int", "Port of the cache engine's own Prometheus /metrics (its "
                                    "lmcache_* figures, per process); null = off. Under vLLM each worker serves "
                                    "on this port + pp_rank x tp_size + tp_rank; vLLM's own /metrics carries the "
                                    "connector's vllm:lmcache_* figures either way.",
                                    optional=True, low=1, high=65535)
    # --- segment (position-independent) reuse, read by the vLLM connector ---
    segment_reuse: bool = _key(
        False, "bool", "Also reuse cached segments (RAG passages, documents) found after a different "
        "preamble, K re-rotated to the new positions. Approximate: the cached KV never saw the new "
        "preamble. A request opts out with kv_transfer_params {\"segment_reuse\": false}.")
    segment_separator: str | None = _key(
        None, "str", "Token sequence that ends a segment: text, tokenized with the model's tokenizer, or "
        "explicit ids written \"ids:13,198\"; null = only explicit kv_transfer_params \"segments\".",
        optional=True)
    # --- performance ---
    prefetch_enabled: bool = _key(True, "bool", "Start moving lower-tier chunks up as soon as a lookup "
                                  "has answered.", section="performance")
    compression_enabled: bool = _key(True, "bool", "false = store chunks raw (codec none); a lossy codec "
                                     "with this false is an error.", section="performance")
    codec: str = _key("zstd", "choice", "zstd: lossless (default). none: raw. int8, fp8, int4: lossy "
                      "quantization, only when asked for.", section="performance",
                      choices=("zstd", "none", "int8", "fp8", "int4"))
    compression_level: int = _key(1, "int", "zstd level (negative = faster, less compression). 1: on real "
                                  "KV both faster and smaller than 3 (1.47x vs 1.41x, decode 2.6x faster on shared/data).",
                                  section="performance", low=-7, high=22)
    compression_min_ratio: float = _key(
        1.25, "float", "zstd output is kept only when a chunk shrinks at least this much, else the chunk is "
        "stored raw: decoding costs more time than the bytes it saves (SmolLM2 float32 KV: 1.19x, decoded "
        "4.8x slower than raw; bf16 KV 1.45x is kept). 1 = keep zstd whenever it is smaller.",
        section="performance", low=1.0, high=1000.0)
    batch_size: int = _key(32, "int", "Chunks per batched tier operation (Redis pipeline, disk batch).",
                           section="performance", low=1, high=4096)
    async_load: bool = _key(
        True, "bool", "vLLM connector: a request whose hit needs chunks from L3/L4 loads in the background "
        "(it waits in vLLM's WAITING_FOR_REMOTE_KVS while other requests keep decoding); false = every "
        "load runs before the forward pass of the step that admits it, and the whole batch waits.",
        section="performance")
    layerwise: str = _key(
        "auto", "choice", "vLLM connector: load and save KV layer by layer (layer i's load overlaps the "
        "compute of the layers before it; saves go out per layer). auto = on for CUDA, off on CPU (measured "
        "slower there: no spare cores to overlap with).", section="performance", choices=("auto", "on", "off"))
    lookup_timeout: float = _key(
        5.0, "seconds", "vLLM connector: how long a request may wait for the workers to answer its lookup "
        "(the scheduler goes on with other requests meanwhile; a worker busy with a long prefill on a "
        "crowded host answers late); past it the request is a miss (it computes).", section="performance",
        low=0, low_open=True)

    def __post_init__(self):
        for key in KEYS:
            value = getattr(self, key.name)
            checked = key.coerce(value, "CacheConfig(...)")
            if checked is not value:
                object.__setattr__(self, key.name, checked)
        if self.compression_enabled is False and self.codec in ("int8", "fp8", "int4"):
            raise ConfigError(f"codec is {self.codec!r} (lossy) but compression_enabled is false; "
                              "set one of them differently")
        if self.max_local_cpu_size == 0 and (self.local_cache_dir or self.remote_url):
            raise ConfigError("max_local_cpu_size is 0, but L2 is the staging ground of local_cache_dir "
                              "and remote_url; give L2 some room or unset both")
        if self.local_cache_dir and self.max_local_cache_size == 0:
            raise ConfigError("local_cache_dir is set but max_local_cache_size is 0; set a size or "
                              "unset local_cache_dir")

    @property
    def effective_codec(self) -> str:
        """The codec chunks are stored with: `codec`, or "none" when compression_enabled is false."""
        return self.codec if self.compression_enabled else "none"

    def __repr__(self) -> str:
        shown = (f"{k.name}={MASK!r}" if k.secret and getattr(self, k.name) is not None
                 else f"{k.name}={getattr(self, k.name)!r}" for k in KEYS)
        return f"CacheConfig({', '.join(shown)})"

    # --- loading ---
    @classmethod
    def load(cls, file: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
             overrides: Mapping[str, Any] | None = None) -> "CacheConfig":
        """Defaults < YAML file (`file`, else $LMCACHE_CONFIG_FILE) < LMCACHE_* variables of `env`
        (default os.environ) < `overrides`."""
        env = os.environ if env is None else env
        path = file if file is not None else (env.get(CONFIG_FILE_ENV) or None)
        items = []
        if path is not None:
            items += _sectioned_items(_read_yaml(path), os.fspath(path))
        items += _env_items(env)
        if overrides is not None:
            items += _sectioned_items(overrides, "overrides")
        return cls._build(items)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "CacheConfig":
        """Defaults < the YAML file at `path`; the environment is not read."""
        return cls._build(_sectioned_items(_read_yaml(path), os.fspath(path)))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "CacheConfig":
        """Defaults < the file $LMCACHE_CONFIG_FILE names (if set) < LMCACHE_* variables."""
        return cls.load(env=env)

    @classmethod
    def _build(cls, items: list[tuple[str, Any, str]]) -> "CacheConfig":
        values, origin = {}, {}
        for name, value, source in items:  # later items are higher layers
            values[name] = _KEY_BY_NAME[name].coerce(value, source)
            origin[name] = source
        if "max_local_cache_size" in values and "local_cache_dir" not in values:
            # A disk size and no directory ("LMCACHE_LOCAL_DISK_SIZE=128" alone): a disk tier was asked for.
            values["local_cache_dir"] = default_disk_dir()
            origin["local_cache_dir"] = f"default for {origin['max_local_cache_size']}"
        try:
            return cls(**values)
        except ConfigError as e:
            named = [f"{n} from {s}" for n, s in origin.items() if re.search(rf"\b{n}\b", str(e))]
            raise ConfigError(f"{e}" + (f" ({'; '.join(named)})" if named else "")) from None


def default_disk_dir() -> str:
    """DEFAULT_DISK_DIR: `$XDG_CACHE_HOME/lmcache-core/chunks`, else `~/.cache/lmcache-core/chunks` (the
    disk tier creates it with mode 0700)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lmcache-core", "chunks")


KEYS: tuple[Key, ...] = tuple(Key(f.name, f.default, **f.metadata["key"]) for f in fields(CacheConfig))
_KEY_BY_NAME = {k.name: k for k in KEYS}
ENV_VARS = {k.env_var: k.name for k in KEYS} | ENV_ALIASES


def _sectioned_items(data: Any, source: str) -> list[tuple[str, Any, str]]:
    """(key, value, source) for every key of a file or overrides mapping, flat or in sections."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of keys (or sections {', '.join(SECTIONS)}), "
                          f"got {type(data).__name__}")
    items, seen = [], {}
    for name, value in data.items():
        where = source
        entries = [(name, value)]
        if name in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: section {name}: expected a mapping, got {type(value).__name__}")
            where, entries = f"{source} [{name}]", list(value.items())
        for key, item in entries:
            if key not in _KEY_BY_NAME:
                hint = did_you_mean(key, list(_KEY_BY_NAME) + ([] if where != source else list(SECTIONS)))
                raise ConfigError(f"{where}: unknown key {key!r}{hint}")
            if key in seen:
                raise ConfigError(f"{source}: key {key!r} appears twice ({seen[key]} and {where})")
            seen[key] = where
            items.append((key, item, where))
    return items


def _env_items(env: Mapping[str, str]) -> list[tuple[str, Any, str]]:
    items, seen = [], {}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var == CONFIG_FILE_ENV or var in FOREIGN_ENV_VARS:
            continue
        if var not in ENV_VARS:
            hint = did_you_mean(var, list(ENV_VARS) + [CONFIG_FILE_ENV, *FOREIGN_ENV_VARS])
            raise ConfigError(f"environment: unknown variable {var}{hint} (CacheConfig reads LMCACHE_<KEY> "
                              f"for its keys, {CONFIG_FILE_ENV} and {', '.join(ENV_ALIASES)})")
        name = ENV_VARS[var]
        if name in seen:
            raise ConfigError(f"environment: {seen[name]} and {var} both set {name}; keep one")
        seen[name] = var
        items.append((name, _KEY_BY_NAME[name].from_text(env[var], f"env {var}"), f"env {var}"))
    return items


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # a list or mapping as a key (`? [a]`): PyYAML's own message, not a TypeError
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, "found unhashable key", key_node.start_mark)
            if key in keys:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            keys.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
    except OSError as e:
        raise ConfigError(f"{os.fspath(path)}: cannot read the config file: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{os.fspath(path)}: not valid YAML: {e}") from None
    return {} if data is None else data


def keys_markdown() -> str:
    """The key table as Markdown, for the README."""
    rows = ["| key | section | type | default | env variable | meaning |", "|---|---|---|---|---|---|"]
    for k in KEYS:
        default = "null" if k.default is None else (str(k.default).lower() if isinstance(k.default, bool)
                                                    else f'"{k.default}"' if k.default == "" else
                                                    "[]" if k.default == () else k.default)
        env = f"`{k.env_var}`" + "".join(f", `{a}`" for a, n in ENV_ALIASES.items() if n == k.name)
        rows.append(f"| `{k.name}` | {k.section} | {k.type_text()} | `{default}` | {env} | {k.meaning} |")
    return "\n".join(rows) + "\n"


__all__ = ["ByteSize", "CacheConfig", "ConfigError", "Key", "KEYS", "keys_markdown"]
