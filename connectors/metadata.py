"""The step plan (connectors/plan.py) as vLLM's connector metadata: what the scheduler half sends the worker
half with every step's scheduler output."""

from dataclasses import dataclass

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from .plan import StepPlan


@dataclass
class LMCacheCoreMetadata(StepPlan, KVConnectorMetadata):
    pass
