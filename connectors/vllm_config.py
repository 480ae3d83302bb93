"""What the connector reads from vLLM's configuration: the model's fingerprint, the attention KV cache spec and
backend, the layout vLLM's tensors will have, the parallel ranks, and the KVSpec a worker keys chunks with.

The worker computes its KVSpec from the configuration and checks it against the tensors it is handed; the
scheduler needs no spec (it hashes prompts; each worker turns hashes into keys of its own spec).
"""

from kernels import KVLayoutError
from lmcache_core import CacheConfig, ConfigError, KVSpec

from .vllm_layouts import DetectedLayout, detect_layout, expected_logical_shape


def model_fingerprint(model_config) -> str:
    """Model path/name, revision, weights dtype and quantization: what pins the weights that made the KV."""
    parts = [str(model_config.model), f"rev={getattr(model_config, 'revision', None) or '-'}",
             f"dtype={model_config.dtype}", f"quant={getattr(model_config, 'quantization', None) or '-'}"]
    return "|".join(parts)


def attention_spec(kv_cache_config):
    """The one attention KV cache group's spec; other shapes (hybrid models) are refused."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise KVLayoutError(f"LMCacheCoreConnector supports models with one KV cache group (uniform full "
                            f"attention); this model has {len(groups)} groups")
    spec = groups[0].kv_cache_spec
    if not all(hasattr(spec, a) for a in ("num_kv_heads", "head_size", "dtype", "block_size")):
        raise KVLayoutError(f"LMCacheCoreConnector supports attention KV caches; got {type(spec).__name__}")
    if getattr(spec, "sliding_window", None):
        raise KVLayoutError("LMCacheCoreConnector does not support sliding-window attention caches")
    head_size_v = getattr(spec, "head_size_v", None)
    if head_size_v not in (None, 0, spec.head_size):
        raise KVLayoutError(f"LMCacheCoreConnector needs equal K and V head sizes, got {spec.head_size} and "
                            f"{head_size_v}")
    return spec


def is_mla(attn_spec) -> bool:
    return type(attn_spec).__name__.startswith("MLA")


def backend_name(vllm_config) -> str:
    """The attention backend every layer uses (vLLM's own lookup, as the NIXL connector does)."""
    from vllm.distributed.kv_transfer.kv_connector.utils import get_current_attn_backends

    names = sorted({b.get_name() for b in get_current_attn_backends(vllm_config)})
    if len(names) != 1:
        raise KVLayoutError(f"LMCacheCoreConnector needs one attention backend for all layers, got {names}")
    return names[0]


def vllm_layout_name(vllm_config, kv_cache_config) -> str | None:
    return getattr(kv_cache_config, "kv_cache_layout", None) or vllm_config.cache_config.kv_cache_layout


def configured_layout(vllm_config, kv_cache_config) -> DetectedLayout:
    """Our layout as the configuration predicts it (no tensor needed)."""
    spec = attention_spec(kv_cache_config)
    shape = expected_logical_shape(kv_cache_config.num_blocks, spec.num_kv_heads, spec.block_size,
                                   spec.head_size, is_mla(spec))
    return detect_layout(backend_name(vllm_config), shape, vllm_layout_name(vllm_config, kv_cache_config))


def _cpu_isa(vllm_config, attn) -> str:
    """The CPU attention kernels' ISA (it decides the bytes' order inside a block), as vLLM picks it."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(attn.dtype, attn.block_size, attn.head_size, vllm_config.cache_config.cache_dtype)


def parallel_ranks(vllm_config) -> list[tuple[int, int]]:
    """(pp_rank, tp_rank) of every worker of one instance, the lead rank (0, 0) first."""
    par = vllm_config.parallel_config
    return [(pp, tp) for pp in range(par.pipeline_parallel_size) for tp in range(par.tensor_parallel_size)]


def worker_rank() -> tuple[int, int]:
    """This worker's (pp_rank, tp_rank); (0, 0) where no model-parallel group exists (a bare unit test)."""
    from vllm.distributed.parallel_state import get_pp_group, get_tp_group

    try:
        return get_pp_group().rank_in_group, get_tp_group().rank_in_group
    except AssertionError:
        return 0, 0


def kv_spec(vllm_config, kv_cache_config, cache: CacheConfig, layout: DetectedLayout, *, tp_rank: int = 0,
            pp_rank: int = 0, first_layer: int = 0) -> KVSpec:
    """The KVSpec a worker keys its chunks with: the model, the KV geometry this rank holds, and its
    parallel position (TP rank and size, pipeline stage and count, the stage's first layer). Whole-block
    layouts must have chunks of whole blocks."""
    spec = attention_spec(kv_cache_config)
    mla = is_mla(spec)
    name = layout.name
    if layout.whole_blocks:
        if cache.chunk_size % spec.block_size:
            raise ConfigError(f"chunk_size: the {name} layout can only move whole blocks, so chunk_size must be "
                              f"a multiple of vLLM's block size {spec.block_size}; got {cache.chunk_size}")
        name = f"{name}:isa={_cpu_isa(vllm_config, spec)}"
    return KVSpec(
        model=model_fingerprint(vllm_config.model_config),
        dtype=str(spec.dtype).removeprefix("torch."),
        layout=name,
        num_layers=len(kv_cache_config.kv_cache_groups[0].layer_names),
        num_kv=1 if mla else 2,
        num_heads=1 if mla else spec.num_kv_heads,
        head_dim=spec.head_size,
        chunk_size=cache.chunk_size,
        tp_rank=tp_rank,
        tp_size=vllm_config.parallel_config.tensor_parallel_size,
        pp_rank=pp_rank,
        pp_size=vllm_config.parallel_config.pipeline_parallel_size,
        first_layer=first_layer,
    )
