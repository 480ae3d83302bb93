"""The module paths other packages import from `kernels/` (connectors, lmcache_core, bench): a file moved or
renamed inside kernels/ must keep them working, with a plain import where a name now lives elsewhere."""

import importlib

import pytest

PATHS = {
    "kernels.paged_kv": ["resolve_paged", "gather_kv", "scatter_kv"],
    "kernels.layout": ["NAMED_LAYOUTS", "KVLayout"],
    "kernels.errors": ["KVLayoutError"],
    "kernels.chunk_hash": ["as_token_words", "ChunkHasher", "chunk_hashes"],
    "kernels.checksum": ["kv_checksum", "kv_checksum_ref"],
    "kernels.rope": ["rope_shift_ref"],
    "kernels.quant": ["TOKEN_TILE", "QuantizedKV", "QuantMeta", "empty_quantized", "quantize_kv_ref",
                      "dequantize_kv_ref", "quantize_kv", "dequantize_kv", "QUANT_CODECS"],
    "kernels.shuffle": ["shuffle_bytes_ref", "unshuffle_bytes_ref", "compress_kv_lossless",
                        "compress_kv_lossless_ref", "decompress_kv_lossless"],
    "kernels.bits": ["as_int_bits"],
}


@pytest.mark.parametrize("module,names", [pytest.param(m, n, id=m) for m, n in PATHS.items()])
def test_names_other_packages_import_are_where_they_look(module, names):
    mod = importlib.import_module(module)
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{module} lost {missing}: other packages import them from there"
