"""Triton kernels that move and transform KV-cache bytes. Dimension letters, used everywhere:

L layers, N tokens, NB paged blocks, BS block size (tokens per block), H kv heads, D head dim,
2 the K/V pair. A slot is one token's place in the paged cache: slot = block_id * BS + offset.
"""

from .checksum import kv_checksum, kv_checksum_ref
from .chunk_hash import ChunkHasher, chunk_hashes
from .errors import KVLayoutError
from .layout import KVLayout
from .paged_kv import gather_kv, gather_kv_ref, scatter_kv, scatter_kv_ref
from .quant import QUANT_CODECS, QuantizedKV, QuantMeta, dequantize_kv, dequantize_kv_ref, quantize_kv, quantize_kv_ref
from .quant_paged import (gather_kv_quantized, gather_kv_quantized_ref, scatter_kv_dequantized,
                          scatter_kv_dequantized_ref)
from .rope import rope_inv_freq, rope_shift, rope_shift_ref
from .shuffle import (compress_kv_lossless, compress_kv_lossless_ref, decompress_kv_lossless, shuffle_bytes,
                      shuffle_bytes_ref, unshuffle_bytes, unshuffle_bytes_ref)

__all__ = [
    "ChunkHasher", "chunk_hashes", "kv_checksum", "kv_checksum_ref",
    "KVLayout", "KVLayoutError", "gather_kv", "gather_kv_ref", "scatter_kv", "scatter_kv_ref",
    "rope_inv_freq", "rope_shift", "rope_shift_ref",
    "QUANT_CODECS", "QuantizedKV", "QuantMeta", "quantize_kv", "quantize_kv_ref", "dequantize_kv", "dequantize_kv_ref",
    "gather_kv_quantized", "gather_kv_quantized_ref", "scatter_kv_dequantized", "scatter_kv_dequantized_ref",
    "shuffle_bytes", "shuffle_bytes_ref", "unshuffle_bytes", "unshuffle_bytes_ref", "compress_kv_lossless",
    "compress_kv_lossless_ref", "decompress_kv_lossless",
]
