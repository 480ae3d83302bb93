"""The reliability suite uses the real Redis fixtures of tests/lmcache_core/conftest.py (standalone nodes and
fresh 3+3 clusters; not the session cluster, which these tests would damage)."""

from tests.lmcache_core.conftest import (  # noqa: F401  (pytest finds fixtures by name)
    redis_binaries,
    redis_cluster_factory,
    redis_cluster_replicas,
    redis_node,
    redis_node_factory,
)
