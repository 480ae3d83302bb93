"""LocalLocks and ChainedLocks: `claim` (busy, or take every key nobody else holds), expiry, and the chain's
give-back when a later layer refuses; checked against a plain model over random scenarios, and against the
old sequence (held_by_other of the first key, then acquire). Redis as a layer: test_redis_locks.py."""

import random

import pytest

from lmcache_core.keys import ChunkKey
from lmcache_core.singleflight import ChainedLocks, Grant, LocalLocks

KEYS = [ChunkKey(bytes(16), i.to_bytes(16, "little")) for i in range(8)]


class Clock:
    """A clock the test moves by hand (LocalLocks takes any `clock` callable)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def holders(locks: LocalLocks, keys=KEYS) -> list[str | None]:
    """Who holds each key (None, "A", "B" or "C"), read through held_by_other."""
    out = []
    for k in keys:
        free = not any(locks.held_by_other([k], "nobody"))
        out.append(None if free else next(o for o in ("A", "B", "C") if not locks.held_by_other([k], o)[0]))
    return out


def test_claim_takes_free_keys_refreshes_its_own_and_skips_others():
    clock = Clock()
    locks = LocalLocks(clock)
    assert locks.claim([], "A", 5.0) == Grant(False, ())
    assert locks.claim(KEYS[2:4], "B", 5.0) == Grant(False, (True, True))
    assert locks.claim(KEYS[:5], "A", 5.0) == Grant(False, (True, True, False, False, True))
    assert holders(locks)[:5] == ["A", "A", "B", "B", "A"]
    clock.now += 4.0
    assert locks.claim(KEYS[:1], "A", 5.0) == Grant(False, (True,))  # refreshed: A's until now + 5
    clock.now += 3.0  # B's expired, A's first key not, A's others did
    assert holders(locks)[:5] == ["A", None, None, None, None]


def test_a_busy_claim_leaves_the_owner_holding_none_of_its_keys():
    locks = LocalLocks(Clock())
    locks.claim(KEYS[:1], "A", 5.0)
    locks.claim(KEYS[3:6], "B", 5.0)
    assert locks.claim([KEYS[0], KEYS[1], KEYS[3]], "B", 5.0) == Grant.refused(3)
    assert holders(locks)[:6] == ["A", None, None, None, "B", "B"], "B gave back keys[3]; keys[1] untaken"


def test_chained_claim_gives_back_what_earlier_layers_granted():
    local, shared = LocalLocks(Clock()), LocalLocks(Clock())  # shared stands for another instance's view
    chain = ChainedLocks(local, shared)
    shared.claim(KEYS[2:3], "B", 5.0)  # another instance computes keys[2]
    assert chain.claim(KEYS[:4], "A", 5.0) == Grant(False, (True, True, False, True))
    assert holders(local)[:4] == ["A", "A", None, "A"], "refused by the shared layer: released locally"
    shared.claim(KEYS[5:6], "B", 5.0)
    assert chain.claim(KEYS[5:8], "C", 5.0) == Grant.refused(3)
    assert holders(local)[5:8] == [None, None, None], "busy in the shared layer: the local grant is given back"
    assert chain.claim(KEYS[:2], "C", 5.0) == Grant.refused(2), "busy locally"


@pytest.mark.parametrize("seed", range(200))
def test_claim_matches_a_model_and_the_old_sequence(seed):
    """Random holders in two layers, then one claim by A: the grant and who holds what afterwards follow the
    documented rule; and the decision (busy or compute) is the one the old sequence (held_by_other of the
    first key, then acquire) made."""
    rng = random.Random(seed)
    n = rng.randint(1, 6)
    keys = rng.sample(KEYS, n)
    setup = [[rng.choice([None, None, "A", "B"]) for _ in KEYS] for _layer in range(2)]

    def build():
        layers = [LocalLocks(Clock()), LocalLocks(Clock())]
        for layer, who in zip(layers, setup):
            for k, owner in zip(KEYS, who):
                if owner is not None:
                    layer.acquire([k], owner, 5.0)
        return layers, ChainedLocks(*layers)

    # the model: a layer is busy when B holds the first key asked; a layer busy or refusing a key releases
    # A's hold on it in that layer and the ones before; later layers are not asked
    state = [[setup[i][KEYS.index(k)] for k in keys] for i in range(2)]
    want, held, busy = list(range(n)), [True] * n, False
    for j in range(2):
        if state[j][want[0]] == "B":
            for i in range(j + 1):
                state[i] = [None if (w in want and o == "A") else o for w, o in enumerate(state[i])]
            busy, held = True, [False] * n
            break
        for w in want:
            if state[j][w] == "B":
                held[w] = False
                for i in range(j):
                    state[i][w] = None
            else:
                state[j][w] = "A"
        want = [w for w in want if held[w]]

    layers, chain = build()
    assert chain.claim(keys, "A", 5.0) == Grant(busy, tuple(held))
    assert [holders(layer, keys) for layer in layers] == state

    _, old = build()
    assert busy == (old.held_by_other(keys[:1], "A")[0] or not old.acquire(keys, "A", 5.0)[0])
