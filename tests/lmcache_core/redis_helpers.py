"""What the Redis test files share: random chunk keys and values around the part-size edges, a RedisTier
fixture that closes what it made, a URL nobody listens on."""

import random
import time

import pytest

from lmcache_core.keys import ChunkKey
from lmcache_core.tiers.redis_tier import MANIFEST, RedisTier, part_name
from tests.redis_servers import LOOPBACK, free_port

KiB, MiB = 2**10, 2**20
PART = 64 * KiB
SLACK_S = 0.5  # scheduling slack on a loaded 2-core CI box, on top of the timeout being tested
INSTANT_S = 0.05  # a call answered from the back-off (measured < 1 ms)


def make_keys(rng: random.Random, n: int) -> list[ChunkKey]:
    return [ChunkKey(rng.randbytes(16), rng.randbytes(16)) for _ in range(n)]


# sizes around every boundary: empty, the manifest's own length, the part size, several parts
EDGE_SIZES = [0, 1, MANIFEST.size - 1, MANIFEST.size, MANIFEST.size + 1, PART - 1, PART, PART + 1, 300 * KiB]


def make_values(rng: random.Random, n: int) -> list[bytes]:
    sizes = EDGE_SIZES + [rng.randrange(0, 400 * KiB) for _ in range(n - len(EDGE_SIZES))]
    return [rng.randbytes(s) for s in sizes[:n]]


@pytest.fixture
def tiers():
    made: list[RedisTier] = []

    def make(url, **kwargs) -> RedisTier:
        kwargs.setdefault("timeout", 0.5)
        tier = RedisTier(url, **kwargs)
        made.append(tier)
        return tier

    yield make
    for tier in made:
        tier.close()


def closed_port_url() -> str:
    return f"redis://{LOOPBACK}:{free_port()}"  # nothing listens there: connection refused


def parts_of(client, key: ChunkKey) -> int:
    """How many consecutive part keys exist for `key` (checked one past the last)."""
    n = 0
    while client.exists(part_name(key, n)):
        n += 1
    return n


def timed(fn, *args):
    t0 = time.monotonic()
    out = fn(*args)
    return out, time.monotonic() - t0


def cluster_url(cluster) -> str:
    """A redis-cluster:// URL seeded with every node of a tests.redis_servers.RedisCluster."""
    return "redis-cluster://" + ",".join(f"{n.host}:{n.port}" for n in cluster.nodes)
