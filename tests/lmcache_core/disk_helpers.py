"""What the DiskTier test files share: keys, self-checking values, where a chunk's file is, a tier fixture.

Values carry a blake2b digest of their body, so a torn or mixed file is caught."""

import hashlib
import random
import time
from pathlib import Path

import pytest

from lmcache_core.keys import ChunkKey
from lmcache_core.tiers.disk import DiskTier

KiB = 1024


def key(i: int) -> ChunkKey:
    return ChunkKey(b"\x11" * 16, hashlib.blake2b(str(i).encode(), digest_size=16).digest())


def value(size: int, seed: int | None = None) -> bytes:
    """`size` bytes: a 16-byte blake2b digest of the body, then the body."""
    body = random.Random(seed).randbytes(size - 16)
    return hashlib.blake2b(body, digest_size=16).digest() + body


def whole(v: bytes) -> bool:
    return len(v) > 16 and hashlib.blake2b(v[16:], digest_size=16).digest() == v[:16]


def path_of(root: Path, k: ChunkKey) -> Path:
    """The documented layout, spelled out here (not taken from the module under test)."""
    return root / k.chunk_hash.hex()[:2] / f"{k.name}.lmc"


def chunk_files(root: Path) -> list[Path]:
    return sorted(root.glob("??/*.lmc"))


def wait_for(cond, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def make_tier(tmp_path):
    """make_tier(capacity=1 GiB, path=tmp_path/"l3", **DiskTier kwargs); every tier made is closed after."""
    tiers = []

    def make(capacity: int = 1 << 30, path: Path | None = None, **kwargs) -> DiskTier:
        tier = DiskTier(str(path or tmp_path / "l3"), capacity, **kwargs)
        tiers.append(tier)
        return tier

    yield make
    for tier in tiers:
        tier.close()
