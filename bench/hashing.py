"""Chunk-key hashing and KV checksum throughput, beside the baselines measured in the same run.

    python -m bench.hashing [--tokens 1024 32768 131072] [--output results/hashing.json]

Hashing: tokens/s of `chunk_hashes` (sha256 default, blake2b, xxh3_128), of `ChunkHasher` fed one chunk at a time, of
vLLM's own request block hasher (`get_request_block_hasher` with `sha256` / `sha256_cbor`, on a real
`vllm.v1.request.Request`, block sizes 16 and 128) and of LMCache's `ChunkedTokenDatabase`; a baseline that
cannot be imported is listed as skipped with the reason. Token ids are Python lists, as in vLLM's
scheduler. Checksum: GB/s of `kv_checksum_ref` (CPU) on one `[L, 2, N, H, D]` bf16 staging tensor beside
a plain `torch.sum` over the same tensor (the memory roofline), and of the Triton kernel when CUDA exists.
"""

import argparse
import hashlib
import logging
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from bench.common import Report, measure, print_table
from kernels.checksum import kv_checksum, kv_checksum_ref
from kernels.chunk_hash import ChunkHasher, chunk_hashes


@dataclass(frozen=True)
class Config:
    tokens: tuple[int, ...] = (1024, 32768, 131072)
    chunk_size: int = 256
    ours_extra_chunk_sizes: tuple[int, ...] = (16, 128)  # ours at vLLM's granularities, like for like
    vllm_block_sizes: tuple[int, ...] = (16, 128)
    repeats: int = 15
    warmup: int = 2
    checksum_shape: tuple[int, ...] = (32, 2, 256, 8, 128)
    checksum_repeats: int = 10
    threads: int = 0  # torch intra-op threads for the checksum; 0 keeps torch's default
    output: str | None = None

    def __post_init__(self):
        if not self.tokens or min(self.tokens) <= 0:
            raise ValueError(f"tokens: expected positive token counts, got {self.tokens}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"repeats/warmup: expected >= 1 / >= 0, got {self.repeats}/{self.warmup}")


def _vllm_hashers(cfg: Config) -> tuple[dict[str, Callable[[list[int]], Callable[[], object]]], str]:
    """name -> (token list -> a zero-arg callable hashing all blocks of a Request) using vLLM's own code,
    and a note: the vLLM version, or why it was skipped."""
    try:
        import vllm
        from vllm.sampling_params import SamplingParams
        from vllm.utils.hashing import sha256, sha256_cbor
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.request import Request
    except Exception as e:  # noqa: BLE001 - any import failure means "skipped", with its reason
        return {}, f"vllm not importable: {type(e).__name__}: {e}"

    def make(fn, bs):
        def prepare(toks):
            init_none_hash(fn)
            hasher = get_request_block_hasher(bs, fn)
            req = Request("bench", toks, SamplingParams(max_tokens=1), None)
            return lambda: hasher(req)  # req.block_hashes stays empty: every call hashes every block
        return prepare

    return {f"vllm {fn.__name__} bs={bs}": make(fn, bs) for fn in (sha256, sha256_cbor)
            for bs in cfg.vllm_block_sizes}, f"vllm {vllm.__version__}"


def _lmcache_hasher(cfg: Config):
    try:
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.token_database import ChunkedTokenDatabase

        config = LMCacheEngineConfig.from_defaults(chunk_size=cfg.chunk_size)
        if hasattr(config, "pre_caching_hash_algorithm"):
            config.pre_caching_hash_algorithm = "sha256_cbor"
        db = ChunkedTokenDatabase(config, None)
    except Exception as e:  # noqa: BLE001
        return None, f"lmcache not importable: {type(e).__name__}: {e}"
    return (lambda toks: lambda: list(db.process_tokens(tokens=toks, make_key=False))), None


def _incremental(cs: int):
    def prepare(toks):
        pieces = [toks[i:i + cs] for i in range(0, len(toks), cs)]

        def run():
            h = ChunkHasher(cs)
            for p in pieces:
                h.update(p)
            return h.hashes
        return run
    return prepare


def bench_hashing(cfg: Config, report: Report) -> list[dict]:
    cs = cfg.chunk_size
    impls = {
        f"ours sha256 cs={cs}": lambda t: lambda: chunk_hashes(t, cs),
        f"ours sha256 cs={cs} (numpy in)": lambda t: (lambda a: lambda: chunk_hashes(a, cs))(np.array(t)),
        f"ours blake2b cs={cs}": lambda t: lambda: chunk_hashes(t, cs, algo="blake2b"),
        f"ours xxh3_128 cs={cs}": lambda t: lambda: chunk_hashes(t, cs, algo="xxh3_128"),
        f"ours ChunkHasher cs={cs}, 1 chunk/update": _incremental(cs),
    }
    for algo in ("blake2b", "sha256"):  # the primitive's own speed over the same bytes: no chunking, no list
        impls[f"floor: one hashlib.{algo} call on 4N bytes"] = (
            lambda a: lambda t: (lambda b: lambda: hashlib.new(a, b).digest())(np.array(t, "<u4").tobytes()))(algo)
    for extra in cfg.ours_extra_chunk_sizes:
        impls[f"ours sha256 cs={extra}"] = (lambda c: lambda t: lambda: chunk_hashes(t, c))(extra)
    vllm, note = _vllm_hashers(cfg)
    impls.update(vllm)
    report.notes.append(("baseline: " if vllm else "skipped: ") + note)
    lmc, why = _lmcache_hasher(cfg)
    if lmc:
        impls[f"lmcache ChunkedTokenDatabase cs={cs}"] = lmc
    else:
        report.notes.append(f"skipped: {why}")
    rows = []
    for n in cfg.tokens:
        toks = np.random.default_rng(n).integers(0, 152_000, n).tolist()
        assert _incremental(cs)(toks)() == chunk_hashes(toks, cs), "ChunkHasher != chunk_hashes"
        for name, prepare in impls.items():
            t = measure(prepare(toks), repeats=cfg.repeats, warmup=cfg.warmup)
            rows.append({"impl": name, "tokens": n, "median_ms": t.median_s * 1e3, "p20_ms": t.p20_s * 1e3,
                         "p80_ms": t.p80_s * 1e3, "warmup_ms": t.warmup_s * 1e3, "Mtok_s": t.rate(n) / 1e6})
        for bs in cfg.vllm_block_sizes:
            base = next((r for r in rows if r["tokens"] == n and r["impl"] == f"vllm sha256 bs={bs}"), None)
            for r in rows:
                if r["tokens"] == n:
                    r[f"x_vs_sha256_bs{bs}"] = base["median_ms"] / r["median_ms"] if base else None
    return rows


def bench_checksum(cfg: Config) -> list[dict]:
    t = torch.randn(cfg.checksum_shape).to(torch.bfloat16)
    nbytes = t.numel() * t.element_size()
    cases = [("torch.sum bf16 (roofline)", lambda: t.sum(), None),
             ("kv_checksum_ref (torch, cpu)", lambda: kv_checksum_ref(t), None)]
    if torch.cuda.is_available():
        g = t.cuda()
        cases += [("torch.sum bf16 (cuda roofline)", lambda: g.sum(), "cuda"),
                  ("kv_checksum (triton, cuda)", lambda: kv_checksum(g), "cuda")]
    rows = []
    for name, fn, dev in cases:
        m = measure(fn, repeats=cfg.checksum_repeats, warmup=2, device=dev)
        rows.append({"impl": name, "bytes": nbytes, "median_ms": m.median_s * 1e3, "p20_ms": m.p20_s * 1e3,
                     "p80_ms": m.p80_s * 1e3, "GB_s": m.rate(nbytes) / 1e9})
    for r in rows:
        r["x_of_roofline"] = rows[0]["median_ms"] / r["median_ms"]
    return rows


def parse_args(argv=None) -> Config:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=list(d.tokens))
    p.add_argument("--chunk-size", type=int, default=d.chunk_size)
    p.add_argument("--ours-extra-chunk-sizes", type=int, nargs="*", default=list(d.ours_extra_chunk_sizes))
    p.add_argument("--vllm-block-sizes", type=int, nargs="+", default=list(d.vllm_block_sizes))
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--checksum-shape", type=int, nargs="+", default=list(d.checksum_shape))
    p.add_argument("--checksum-repeats", type=int, default=d.checksum_repeats)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--output", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    return Config(tuple(a.tokens), a.chunk_size, tuple(a.ours_extra_chunk_sizes), tuple(a.vllm_block_sizes),
                  a.repeats, a.warmup, tuple(a.checksum_shape), a.checksum_repeats, a.threads, a.output)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING)
    cfg = parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    report = Report("hashing", asdict(cfg))
    hashing = bench_hashing(cfg, report)
    checksum = bench_checksum(cfg)
    report.rows = [{"part": "hashing", **r} for r in hashing] + [{"part": "checksum", **r} for r in checksum]
    cols = ["impl", "tokens", "median_ms", "p20_ms", "p80_ms", "Mtok_s"]
    cols += [f"x_vs_sha256_bs{bs}" for bs in cfg.vllm_block_sizes]
    print("chunk-key hashing (host, Python list input unless noted)")
    print_table(hashing, cols)
    for note in report.notes:
        print(note)
    print(f"\nkv_checksum on {list(cfg.checksum_shape)} bf16 ({checksum[0]['bytes'] / 1e6:.1f} MB), "
          f"torch threads {torch.get_num_threads()}")
    print_table(checksum, ["impl", "median_ms", "p20_ms", "p80_ms", "GB_s", "x_of_roofline"])
    report.write(cfg.output)


if __name__ == "__main__":
    main()
