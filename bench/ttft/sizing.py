"""Sizes `bench.ttft` derives from the model and the workload: KV bytes per token, context length, and how
much a prefix cache can hold at most over a run (to size vLLM's KV cache and our memory tiers)."""

from bench.ttft.config import DTYPE_BYTES


def model_geometry(model: str, dtype: str) -> tuple[int, int]:
    """(max positions, KV bytes per token) from the model's config."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    return text.max_position_embeddings, text.num_hidden_layers * 2 * kv_heads * head_dim * DTYPE_BYTES[dtype]


def distinct_chunks(requests, chunk: int) -> int:
    """Distinct prefix chunks over `requests`: what a prefix cache holds at most after serving them."""
    seen = set()
    for req in requests:
        h = None
        for i in range(len(req.tokens) // chunk):
            h = hash((h, req.tokens[i * chunk:(i + 1) * chunk]))
            seen.add(h)
    return len(seen)


def context_length(longest: int, max_positions: int, given: int | None) -> int:
    """max_model_len: `given`, else room for the longest prompt (+64) in whole 1024s, at most the model's.
    Not the model's whole context: vLLM reserves KV for max_model_len tokens."""
    return given or min(max_positions, -(-(longest + 64) // 1024) * 1024)
