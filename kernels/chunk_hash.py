"""Chunk keys: one 128-bit hash per full chunk of `chunk_size` token ids (N tokens, N // chunk_size chunks).

Token hashing runs on the host, never on the device: in every engine the scheduler holds token ids in CPU
memory (Python lists or numpy arrays) and decides what to load before any KV moves. There is no Triton
kernel here; the work is one bytes conversion of the whole array, then one hash call per chunk over a
memoryview slice (no per-token Python work).

Encoding (version 1; a change of any byte below is a format break and must change the tags):
  - token ids: each id must satisfy 0 <= t < 2**32 and is encoded as 4 bytes, unsigned little-endian
    (`<u4`). Every tokenizer in use has < 2**32 ids (the largest are ~2.6e5), so 4 bytes lose nothing and
    hash half the bytes of int64; ids outside that range raise ValueError instead of wrapping.
  - salt field: `len(salt)` as 4 bytes unsigned little-endian, then the salt bytes (length-prefixed so that
    salt and tokens can never trade bytes).
  - prefix mode:  h_i = H(b"LMCKV/P1" || h_{i-1} || salt field || tokens_i), with h_{-1} = 16 zero bytes.
  - segment mode: h_i = H(b"LMCKV/S1" || salt field || tokens_i).
    The 8-byte tags domain-separate the modes: a segment and a prefix hash of the same tokens hash different
    messages, so they can only be equal through a collision of H.
  - H = "sha256" (default): the first 16 bytes of hashlib.sha256(message). Collision resistant (2**64
    birthday bound at 128 bits): use it whenever requests from different users share a cache. Chosen over
    blake2b because x86 and Arm CPUs hash SHA-256 in hardware: 1.6x faster than blake2b here (bench.hashing).
  - H = "blake2b": hashlib.blake2b(message, digest_size=16), no key, salt or person. Collision resistant.
  - H = "xxh3_128": XXH3-128 with seed 0, digest in XXH128 canonical (big-endian) byte order. NOT collision
    resistant: anyone who can choose prompts can craft two that collide and read another request's KV. Use
    it only for trusted, single-tenant deployments. Needs the `xxhash` package.

Return type: `list[bytes]`, 16 bytes per full chunk in chunk order. `bytes` is hashable and compares by
value, so a hash is a dict key as is; `h.hex()` prints it. A trailing partial chunk gets no hash.
Keys must also carry chunk_size, mode and algo (e.g. in the ChunkKey's kv spec): the hash alone does not.
"""

import array
import hashlib
import operator
import struct
import sys

import numpy as np
import torch

HASH_BYTES = 16  # 128-bit hashes: birthday bound 2**64 chunks, far beyond any cache
ROOT_HASH = bytes(HASH_BYTES)  # h_{-1}, the parent of a prefix-mode sequence's first chunk
MODES = ("prefix", "segment")
ALGOS = ("sha256", "blake2b", "xxh3_128")
_HASHLIB = {
    "sha256": hashlib.sha256,
    "blake2b": lambda data=b"": hashlib.blake2b(data, digest_size=HASH_BYTES),
}
_TAGS = {"prefix": b"LMCKV/P1", "segment": b"LMCKV/S1"}
_MAX_TOKEN = 2**32 - 1
_EMPTY = np.zeros(0, dtype="<u4")
_EMPTY.flags.writeable = False
# array('I') converts a list of ints at ~6 ns per token (4.5x faster than np.asarray) and range-checks for
# free, but only where C's unsigned int is 4 bytes and the host is little-endian; else use numpy.
_FAST_LIST = array.array("I").itemsize == 4 and sys.byteorder == "little"


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}" if not hasattr(value, "shape") else (
        f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}")


def _first_bad(arr: np.ndarray) -> str:
    bad = np.flatnonzero((arr < 0) | (arr > _MAX_TOKEN))
    return f"{arr[bad[0]]} at index {bad[0]}"


def _check_range(arr: np.ndarray, name: str) -> None:
    if arr.size == 0:
        return
    low_ok = arr.dtype.kind == "u" or arr.min() >= 0
    high_ok = arr.dtype.itemsize <= 4 or arr.max() <= _MAX_TOKEN  # (u)int8..32 cannot exceed 2**32 - 1
    if not (low_ok and high_ok):
        raise ValueError(f"{name}: expected token ids in [0, 2**32), got {_first_bad(arr)}")


def _sequence_error(seq, name: str) -> Exception:
    """Find the first element array('I') refused and say what and where it is (error path only)."""
    for i, v in enumerate(seq):
        try:
            t = operator.index(v)
        except TypeError:
            return TypeError(f"{name}: expected a 1-D sequence of integer token ids, got {_describe(v)} "
                             f"at index {i}")
        if not 0 <= t <= _MAX_TOKEN:
            return ValueError(f"{name}: expected token ids in [0, 2**32), got {t} at index {i}")
    return TypeError(f"{name}: could not convert {type(seq).__name__} to token ids")


def as_token_words(token_ids, name: str = "token_ids") -> np.ndarray:
    """`token_ids` (list/tuple/range of ints, numpy array or torch tensor, any integer dtype, 1-D) as a
    C-contiguous little-endian uint32 numpy array; raises TypeError/ValueError naming `name`."""
    if isinstance(token_ids, (list, tuple, range)):  # first: the scheduler's usual type
        if _FAST_LIST:
            try:
                return np.frombuffer(array.array("I", token_ids), dtype="<u4")
            except (OverflowError, TypeError):
                raise _sequence_error(token_ids, name) from None
        arr = np.asarray(token_ids) if len(token_ids) else np.zeros(0, dtype=np.int64)
        if arr.dtype.kind not in "iu" or arr.ndim != 1:
            raise _sequence_error(token_ids, name)
        _check_range(arr, name)
        return np.ascontiguousarray(arr, dtype="<u4")
    if isinstance(token_ids, torch.Tensor):
        if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer tensor, got dtype {token_ids.dtype}")
        token_ids = token_ids.detach().cpu().numpy()
    if isinstance(token_ids, np.ndarray):
        if token_ids.dtype.kind not in "iu":
            raise TypeError(f"{name}: expected an integer array, got dtype {token_ids.dtype}")
        if token_ids.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D array of token ids, got shape {token_ids.shape}")
        _check_range(token_ids, name)
        return np.ascontiguousarray(token_ids, dtype="<u4")
    raise TypeError(f"{name}: expected a list, tuple, numpy array or torch tensor of token ids, "
                    f"got {_describe(token_ids)}")


def _check_options(chunk_size, mode, salt, algo) -> bytes:
    """Validate the hashing options; return the encoded salt field (length prefix + salt)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(f"chunk_size: expected a positive int, got {_describe(chunk_size)}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if algo not in ALGOS:
        raise ValueError(f"algo: expected one of {ALGOS}, got {algo!r}")
    if algo == "xxh3_128":
        try:
            import xxhash  # noqa: F401  (asked for by name: fail loudly, no fallback)
        except ImportError as e:
            raise ImportError("algo='xxh3_128' needs the xxhash package: pip install xxhash") from e
    if not isinstance(salt, (bytes, bytearray, memoryview)):
        hint = " (encode a str first, e.g. salt.encode())" if isinstance(salt, str) else ""
        raise TypeError(f"salt: expected bytes, got {_describe(salt)}{hint}")
    salt = bytes(salt)
    if len(salt) > _MAX_TOKEN:
        raise ValueError(f"salt: expected at most 2**32 - 1 bytes, got {len(salt)}")
    return struct.pack("<I", len(salt)) + salt


def _hash_full_chunks(words: np.ndarray, chunk_size: int, mode: str, salt_field: bytes, algo: str,
                      parent: bytes) -> list[bytes]:
    """Hashes of the full chunks of `words` (C-contiguous `<u4`); `parent` is h_{-1} in prefix mode."""
    step = 4 * chunk_size
    end = (words.size // chunk_size) * step
    if end == 0:
        return []
    mv = memoryview(words).cast("B")
    tag = _TAGS[mode]
    if algo in _HASHLIB:
        # copying a state that has absorbed the constant head is ~15% faster per chunk than a new object
        new_hash = _HASHLIB[algo]
        if mode == "segment":
            head = new_hash(tag + salt_field)
            out = []
            for off in range(0, end, step):
                h = head.copy()
                h.update(mv[off:off + step])
                out.append(h.digest()[:HASH_BYTES])
            return out
        head, out, prev = new_hash(tag), [], parent
        for off in range(0, end, step):
            h = head.copy()
            h.update(prev)
            h.update(salt_field)
            h.update(mv[off:off + step])
            prev = h.digest()[:HASH_BYTES]
            out.append(prev)
        return out
    from xxhash import xxh3_128_digest  # canonical (big-endian) digest of XXH3-128, seed 0

    if mode == "segment":
        head = tag + salt_field
        return [xxh3_128_digest(head + mv[off:off + step]) for off in range(0, end, step)]
    out, prev = [], parent
    for off in range(0, end, step):
        prev = xxh3_128_digest(b"".join((tag, prev, salt_field, mv[off:off + step])))
        out.append(prev)
    return out


def chunk_hashes(token_ids, chunk_size: int = 256, mode: str = "prefix", salt: bytes = b"",
                 algo: str = "sha256") -> list[bytes]:
    """One 16-byte hash per full chunk of `token_ids` (encoding in the module docstring).

    token_ids: 1-D list/tuple/range of ints, numpy array or torch tensor (any integer dtype, any device;
        a device tensor is copied to the host), each id in [0, 2**32).
    mode: "prefix" chains each hash on the previous one (h_i covers chunks 0..i, for prefix reuse);
        "segment" hashes each chunk's own tokens only (reuse at another position).
    salt: bytes mixed into every hash (cache isolation between tenants); b"" for none.
    algo: "sha256" (default) or "blake2b" (both collision resistant), or "xxh3_128" (fast, NOT collision
        resistant: trusted single-tenant use only).
    Returns list[bytes] with N // chunk_size entries; a trailing partial chunk is ignored.
    """
    salt_field = _check_options(chunk_size, mode, salt, algo)
    words = as_token_words(token_ids)
    return _hash_full_chunks(words, int(chunk_size), mode, salt_field, algo, ROOT_HASH)


class ChunkHasher:
    """Incremental `chunk_hashes` for a growing sequence: each `update` hashes only the chunks it completes.

    After any sequence of updates, `hashes` equals `chunk_hashes(all tokens so far, ...)` with the same
    options. State: the last hash (the next chunk's parent in prefix mode) and the < chunk_size tokens of
    the partial chunk, so one update costs O(new tokens), never O(sequence).
    """

    def __init__(self, chunk_size: int = 256, mode: str = "prefix", salt: bytes = b"",
                 algo: str = "sha256"):
        self._salt_field = _check_options(chunk_size, mode, salt, algo)
        self.chunk_size, self.mode, self.algo = int(chunk_size), mode, algo
        self._hashes: list[bytes] = []
        self._pending = _EMPTY

    @property
    def hashes(self) -> list[bytes]:
        """Every full-chunk hash so far (a copy)."""
        return list(self._hashes)

    @property
    def num_tokens(self) -> int:
        return len(self._hashes) * self.chunk_size + self._pending.size

    def update(self, new_tokens) -> list[bytes]:
        """Append `new_tokens` (same input types as `chunk_hashes`); return the hashes of the chunks they
        complete, in order (empty when no chunk was completed)."""
        words = as_token_words(new_tokens, "new_tokens")
        if self._pending.size:
            words = np.concatenate((self._pending, words))
        parent = self._hashes[-1] if self._hashes else ROOT_HASH
        new = _hash_full_chunks(words, self.chunk_size, self.mode, self._salt_field, self.algo, parent)
        self._hashes.extend(new)
        rest = words[len(new) * self.chunk_size:]
        # copy: the remainder may be a view of the caller's array, which they may reuse.
        self._pending = rest.copy() if rest.size else _EMPTY
        return new
