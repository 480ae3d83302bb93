"""chunk_hashes / ChunkHasher: the documented encoding (golden vectors), prefix and segment properties,
input types, incremental equality, validation messages, and stability across processes."""

import hashlib
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels.chunk_hash import ChunkHasher, chunk_hashes

try:
    import xxhash
except ImportError:  # xxhash is a dev extra: only the xxh3_128 cases need it
    xxhash = None
_needs_xxhash = pytest.mark.skipif(xxhash is None, reason="xxhash not installed")
ALGOS = ("sha256", "blake2b") + (("xxh3_128",) if xxhash else ())
ALGO_PARAMS = ["sha256", "blake2b", pytest.param("xxh3_128", marks=_needs_xxhash)]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _spec_hashes(tokens, chunk_size, mode, salt=b"", algo="sha256"):
    """The README's encoding, written from scratch with hashlib/struct (no library code)."""
    tag = {"prefix": b"LMCKV/P1", "segment": b"LMCKV/S1"}[mode]
    salt_field = struct.pack("<I", len(salt)) + salt
    out, parent = [], bytes(16)
    for c in range(len(tokens) // chunk_size):
        body = struct.pack(f"<{chunk_size}I", *tokens[c * chunk_size:(c + 1) * chunk_size])
        msg = tag + (parent if mode == "prefix" else b"") + salt_field + body
        if algo == "sha256":
            h = hashlib.sha256(msg).digest()[:16]
        elif algo == "blake2b":
            h = hashlib.blake2b(msg, digest_size=16).digest()
        else:
            h = xxhash.xxh3_128_digest(msg)
        out.append(h)
        parent = h
    return [h.hex() for h in out]


T7 = [1, 2, 3, 4, 5, 6, 7]
GOLDEN = [  # hex computed once with _spec_hashes; a change here is a format break (bump the tags)
    pytest.param(T7, 3, "prefix", b"", "sha256",
                 ["e4bf3f98a7b0ce6e556b7d1d23be3697", "8864c40631693d5661db4e72f623ec39"], id="sha256-prefix"),
    pytest.param(T7, 3, "segment", b"", "sha256",
                 ["bbb195f2ccfb061e3901829e26fb380d", "d6bd9fd53365b1f35fe01abc2d9822e6"], id="sha256-segment"),
    pytest.param(T7, 3, "prefix", b"tenant-a", "sha256",
                 ["e2ca1b1be3c68a4252f369ad5bfac923", "983477937d9fa4a17033ba4575dd9896"], id="sha256-salted"),
    pytest.param([0, 2**32 - 1, 151643, 7], 2, "prefix", b"", "sha256",
                 ["4e370d8c87b4aa31d3ba6216aa1b7aa0", "c9d6b952ef900ff984e3a905ae30e7b2"], id="sha256-extreme-ids"),
    pytest.param(T7, 3, "prefix", b"", "blake2b",
                 ["482f78e37b14b936421120c4ff4d4c4e", "e63a8b279f3b95b5c0ef0b2e6d923656"], id="prefix"),
    pytest.param(T7, 3, "segment", b"", "blake2b",
                 ["776e850d7020c02d984f1544117b265d", "b2527702fb1ba475f5cda4b0d7b9063f"], id="segment"),
    pytest.param(T7, 3, "prefix", b"tenant-a", "blake2b",
                 ["634b434550797111a14ca9d9021e36b6", "759ebc6497df76a44b9469d0056adb6d"], id="salted"),
    pytest.param([0, 2**32 - 1, 151643, 7], 2, "prefix", b"", "blake2b",
                 ["2833b145d693d3ebc2e9953b7891aa2e", "818088d00aa7d8245d4fff09869b6bc2"], id="extreme-ids"),
    pytest.param(T7, 3, "prefix", b"", "xxh3_128",
                 ["28caf776451ccc743ec375fa18053e06", "2b73324571eaa38fbae0382b76121ec6"], id="xxh3-prefix",
                 marks=_needs_xxhash),
    pytest.param(T7, 3, "segment", b"", "xxh3_128",
                 ["f9170af0fa25db594fb6452e667f480e", "37e8e86cefb14c991a3723eca2ed2e03"], id="xxh3-segment",
                 marks=_needs_xxhash),
]


@pytest.mark.parametrize("tokens,chunk_size,mode,salt,algo,expected", GOLDEN)
def test_golden_vectors(tokens, chunk_size, mode, salt, algo, expected):
    assert _spec_hashes(tokens, chunk_size, mode, salt, algo) == expected
    got = chunk_hashes(tokens, chunk_size=chunk_size, mode=mode, salt=salt, algo=algo)
    assert [h.hex() for h in got] == expected
    assert all(type(h) is bytes and len(h) == 16 for h in got)


def _tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 152_000, n).tolist()


@pytest.mark.parametrize("algo", ALGO_PARAMS)
@pytest.mark.parametrize("i", [0, 1, 5, 7])
def test_prefix_change_in_chunk_i_changes_i_and_later_only(algo, i):
    toks = _tokens(8 * 16 + 5)
    base = chunk_hashes(toks, 16, algo=algo)
    toks[i * 16 + 9] += 1
    new = chunk_hashes(toks, 16, algo=algo)
    assert new[:i] == base[:i]
    assert all(a != b for a, b in zip(new[i:], base[i:]))


@pytest.mark.parametrize("algo", ALGO_PARAMS)
@pytest.mark.parametrize("i", [0, 3, 7])
def test_segment_change_in_chunk_i_changes_only_i(algo, i):
    toks = _tokens(8 * 16)
    base = chunk_hashes(toks, 16, mode="segment", algo=algo)
    toks[i * 16] ^= 1
    new = chunk_hashes(toks, 16, mode="segment", algo=algo)
    assert [k for k in range(8) if new[k] != base[k]] == [i]


def test_segment_hash_is_position_independent():
    a, b = _tokens(16, 1), _tokens(16, 2)
    assert chunk_hashes(a + b, 16, mode="segment") == chunk_hashes(b + a, 16, mode="segment")[::-1]
    assert chunk_hashes(a + b, 16)[1] != chunk_hashes(b + a, 16)[0]  # prefix mode: position matters


@pytest.mark.parametrize("salt", [b"", b"x"])
@pytest.mark.parametrize("algo", ALGO_PARAMS)
def test_modes_are_domain_separated(algo, salt):
    toks = _tokens(64)
    prefix = chunk_hashes(toks, 16, mode="prefix", salt=salt, algo=algo)
    segment = chunk_hashes(toks, 16, mode="segment", salt=salt, algo=algo)
    assert not set(prefix) & set(segment)


def test_partial_last_chunk_is_ignored():
    toks = _tokens(3 * 16 + 15)
    assert len(chunk_hashes(toks, 16)) == 3
    assert chunk_hashes(toks, 16) == chunk_hashes(toks[:48], 16)
    assert chunk_hashes(toks[:15], 16) == [] and chunk_hashes([], 16) == []


@pytest.mark.parametrize("mode", ["prefix", "segment"])
def test_salt_changes_every_hash(mode):
    toks = _tokens(5 * 16)
    plain, salted = chunk_hashes(toks, 16, mode), chunk_hashes(toks, 16, mode, salt=b"tenant-b")
    assert all(a != b for a, b in zip(plain, salted))
    assert chunk_hashes(toks, 16, mode, salt=bytearray(b"tenant-b")) == salted


def test_salt_is_length_prefixed():
    # without a length prefix, salt b"\x01\x00\x00\x00" + tokens [2, 3] would equal salt b"" + tokens [1, 2, 3]
    assert chunk_hashes([2, 3], 2, "segment", salt=struct.pack("<I", 1)) != chunk_hashes([1, 2, 3], 3, "segment")


@pytest.mark.parametrize("convert", [
    pytest.param(list, id="list"), pytest.param(tuple, id="tuple"),
    pytest.param(lambda t: np.array(t, dtype=np.int64), id="np-int64"),
    pytest.param(lambda t: np.array(t, dtype=np.uint32), id="np-uint32"),
    pytest.param(lambda t: np.array(t, dtype=np.int32)[::-1][::-1], id="np-int32-view"),
    pytest.param(lambda t: torch.tensor(t, dtype=torch.int64), id="torch-int64"),
    pytest.param(lambda t: torch.tensor(t, dtype=torch.int32), id="torch-int32"),
    pytest.param(lambda t: torch.tensor(t, dtype=torch.int64).to(torch.uint32), id="torch-uint32"),
])
def test_input_types_agree(convert):
    toks = _tokens(100)
    assert chunk_hashes(convert(toks), 16) == chunk_hashes(toks, 16)


def test_small_int_dtypes():
    toks = list(range(200, 232))
    want = chunk_hashes(toks, 8)
    assert chunk_hashes(np.array(toks, dtype=np.uint8), 8) == want
    assert chunk_hashes(torch.tensor(toks, dtype=torch.int16), 8) == want


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(0, 50), max_size=12), mode=st.sampled_from(["prefix", "segment"]),
       algo=st.sampled_from(ALGOS))
def test_incremental_equals_one_shot(cuts, mode, algo):
    toks = _tokens(sum(cuts) + 3, seed=len(cuts))
    hasher, got, pos = ChunkHasher(8, mode, salt=b"s", algo=algo), [], 0
    for n in cuts + [3]:
        got += hasher.update(np.array(toks[pos:pos + n], dtype=np.int64))
        pos += n
    want = chunk_hashes(toks, 8, mode, salt=b"s", algo=algo)
    assert got == want == hasher.hashes
    assert hasher.num_tokens == len(toks)


def test_incremental_keeps_its_own_copy_of_the_partial_chunk():
    buf = np.arange(12, dtype=np.uint32)
    hasher = ChunkHasher(8)
    assert len(hasher.update(buf)) == 1
    buf[:] = 999  # the caller reuses its buffer
    assert hasher.update(np.arange(12, 16)) == chunk_hashes(list(range(16)), 8)[1:]


@pytest.mark.parametrize("bad,exc,match", [
    pytest.param([1, -1], ValueError, r"token_ids: expected token ids in \[0, 2\*\*32\), got -1 at index 1",
                 id="negative"),
    pytest.param([5, 2**32], ValueError, r"got 4294967296 at index 1", id="too-big-list"),
    pytest.param(np.array([3, 2**40]), ValueError, r"got 1099511627776 at index 1", id="too-big-array"),
    pytest.param(torch.tensor([-7]), ValueError, r"got -7 at index 0", id="negative-tensor"),
    pytest.param([1, 2.5], TypeError, r"expected a 1-D sequence of integer token ids, got float 2.5 at index 1",
                 id="float-in-list"),
    pytest.param([[1, 2]], TypeError, r"got list \[1, 2\] at index 0", id="nested-list"),
    pytest.param(np.zeros((2, 3), dtype=np.int64), ValueError, r"expected a 1-D array of token ids, got shape \(2, 3\)",
                 id="2d-array"),
    pytest.param(np.array([1.0]), TypeError, r"expected an integer array, got dtype float64", id="float-array"),
    pytest.param(torch.ones(3), TypeError, r"expected an integer tensor, got dtype torch.float32", id="float-tensor"),
    pytest.param(torch.ones(3, dtype=torch.bool), TypeError, r"got dtype torch.bool", id="bool-tensor"),
    pytest.param("hello", TypeError, r"expected a list, tuple, numpy array or torch tensor of token ids, got str",
                 id="str"),
])
def test_invalid_token_ids(bad, exc, match):
    with pytest.raises(exc, match=match):
        chunk_hashes(bad, 1)


@pytest.mark.parametrize("kwargs,exc,match", [
    pytest.param({"chunk_size": 0}, ValueError, r"chunk_size: expected a positive int, got 0", id="chunk-0"),
    pytest.param({"chunk_size": 16.0}, TypeError, r"chunk_size: expected a positive int, got float 16.0",
                 id="chunk-float"),
    pytest.param({"mode": "prefx"}, ValueError, r"mode: expected one of \('prefix', 'segment'\), got 'prefx'",
                 id="mode"),
    pytest.param({"algo": "md5"}, ValueError, r"algo: expected one of \('sha256', 'blake2b', 'xxh3_128'\), got 'md5'",
                 id="algo"),
    pytest.param({"salt": "tenant"}, TypeError, r"salt: expected bytes, got str 'tenant' \(encode a str first",
                 id="salt"),
])
def test_invalid_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        chunk_hashes([1, 2, 3], **kwargs)
    with pytest.raises(exc, match=match):
        ChunkHasher(**{"chunk_size": 2, **kwargs})


def test_xxh3_without_xxhash_fails_loudly(monkeypatch):
    monkeypatch.setitem(sys.modules, "xxhash", None)  # makes `import xxhash` raise ImportError
    with pytest.raises(ImportError, match=r"algo='xxh3_128' needs the xxhash package"):
        chunk_hashes([1, 2], 2, algo="xxh3_128")
    assert len(chunk_hashes([1, 2], 2)) == 1  # the default needs nothing beyond hashlib


def test_update_names_its_argument():
    with pytest.raises(ValueError, match=r"new_tokens: expected token ids in \[0, 2\*\*32\)"):
        ChunkHasher(2).update([-1])


_CHILD = ("import sys; from kernels.chunk_hash import chunk_hashes; t = list(range(1000, 1100)); "
          "print(*[h.hex() for m in ('prefix', 'segment') for a in sys.argv[1:] "
          "for h in chunk_hashes(t, 16, m, salt=b'k', algo=a)])")


def test_stable_across_processes():
    here = [h.hex() for m in ("prefix", "segment") for a in ALGOS
            for h in chunk_hashes(list(range(1000, 1100)), 16, m, salt=b"k", algo=a)]
    for seed in ("1", "987654"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", _CHILD, *ALGOS], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120, check=True).stdout.split()
        assert out == here, f"PYTHONHASHSEED={seed}"
