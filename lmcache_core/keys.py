"""Chunk keys: which model, KV layout and token chunk a stored entry belongs to.

A key is `(KVSpec fingerprint, chunk hash)`. The spec fingerprint covers everything that makes two caches'
bytes incompatible (model, dtype, layout, L, H, D, chunk size, and the parallel position: tensor-parallel
rank and size, pipeline stage and stage count), so two models, layouts, TP ranks or pipeline stages never
share an entry. The chunk hash comes from `kernels.chunk_hashes` (prefix or segment mode,
salted with the tenant namespace). Storage names are hex digests: no token id or text ever reaches a file
name or a Redis key.
"""

import hashlib
from dataclasses import dataclass

KEY_BYTES = 32  # 16-byte spec fingerprint + 16-byte chunk hash


@dataclass(frozen=True)
class KVSpec:
    """What a chunk's KV bytes depend on besides its tokens."""

    model: str  # model name plus whatever pins its weights (revision, path, or a weights hash)
    dtype: str  # torch dtype name of the staging tensor, e.g. "bfloat16"
    layout: str  # kernels layout name, e.g. "flash_attn"
    num_layers: int
    num_kv: int  # 2 (K and V) or 1 (MLA)
    num_heads: int  # kv heads held by this rank (1 for MLA)
    head_dim: int
    chunk_size: int
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0  # pipeline stage
    pp_size: int = 1
    first_layer: int = 0  # the model's index of this stage's first layer: the stage holds [first, first + L)

    def __post_init__(self):
        for name in ("num_layers", "num_kv", "num_heads", "head_dim", "chunk_size", "tp_size", "pp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVSpec.{name}: expected a positive int, got {value!r}")
        if self.num_kv not in (1, 2):
            raise ValueError(f"KVSpec.num_kv: expected 1 (MLA) or 2, got {self.num_kv}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"KVSpec.tp_rank: expected 0 <= tp_rank < tp_size={self.tp_size}, got {self.tp_rank}")
        if not isinstance(self.first_layer, int) or self.first_layer < 0:
            raise ValueError(f"KVSpec.first_layer: expected an int >= 0, got {self.first_layer!r}")
        if not 0 <= self.pp_rank < self.pp_size:
            raise ValueError(f"KVSpec.pp_rank: expected 0 <= pp_rank < pp_size={self.pp_size}, got {self.pp_rank}")

    def chunk_shape(self, num_tokens: int | None = None) -> tuple[int, ...]:
        """Staging shape of one chunk: [L, KV, N, H, D] ([L, 1, N, D] for MLA)."""
        n = self.chunk_size if num_tokens is None else num_tokens
        tail = (self.head_dim,) if self.num_kv == 1 else (self.num_heads, self.head_dim)
        return (self.num_layers, self.num_kv, n, *tail)

    @property
    def fingerprint(self) -> bytes:
        """16 bytes identifying the spec: blake2b over its fields, '\\x1f'-separated, in declaration order."""
        fields = (self.model, self.dtype, self.layout, self.num_layers, self.num_kv, self.num_heads,
                  self.head_dim, self.chunk_size, self.tp_rank, self.tp_size, self.pp_rank, self.pp_size,
                  self.first_layer)
        text = "\x1f".join(str(f) for f in fields)
        return hashlib.blake2b(text.encode(), digest_size=16, person=b"lmcache-kvspec").digest()


def chunk_salt(cache_salt: str, namespace: str | None = None) -> bytes:
    """What every chunk hash is salted with: the configured `cache_salt` and the call's namespace (tenant,
    LoRA adapter, request salt). The scheduler (which hashes prompts) and the engine (which stores them)
    must agree on it byte for byte."""
    return (cache_salt + ("\x00" + namespace if namespace else "")).encode()


@dataclass(frozen=True)
class ChunkKey:
    spec: bytes  # KVSpec.fingerprint
    chunk_hash: bytes  # 16 bytes from kernels.chunk_hashes

    def __post_init__(self):
        if len(self.spec) != 16 or len(self.chunk_hash) != 16:
            raise ValueError(f"ChunkKey: expected 16-byte spec and chunk hash, got {len(self.spec)} and "
                             f"{len(self.chunk_hash)} bytes")

    @property
    def raw(self) -> bytes:
        """The 32 bytes written into a stored chunk's header (a reader checks them)."""
        return self.spec + self.chunk_hash

    @property
    def name(self) -> str:
        """Storage name (file name, Redis key suffix): hex only."""
        return f"{self.spec.hex()}-{self.chunk_hash.hex()}"

    @classmethod
    def from_name(cls, name: str) -> "ChunkKey":
        spec, _, chunk = name.partition("-")
        try:
            return cls(bytes.fromhex(spec), bytes.fromhex(chunk))
        except ValueError as e:
            raise ValueError(f"chunk name: expected '<32 hex>-<32 hex>', got {name!r}") from e
