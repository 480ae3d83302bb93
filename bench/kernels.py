"""`python -m bench.kernels`: gather/scatter bandwidth beside a plain copy and a naive loop, same run.

GB/s counts bytes read plus bytes written (2x the staging bytes); before timing, each configuration's
gather and scatter are checked against the torch reference (on a GPU: the Triton kernel against it).
Baselines measured in the same run:
- `copy`: the roofline for a byte mover. CPU: contiguous `copy_`s of the same number of bytes from the same
  cache tensors into the staging buffer (one slice per layer and K/V). CUDA: one device-to-device `copy_` of
  the same bytes (64 launches would measure launch gaps; L2 is flushed before every timed call);
- `copy_hot`: one `copy_` between two staging-sized buffers; on CPU they stay in the last-level cache when
  small, so it overstates the roofline there (reported for reference only; on CUDA it is `copy`);
- `naive`: a per-layer loop of advanced indexing (`cache[:, blocks, offsets]`), what one writes first;
- `lmcache`: LMCache's `multi_layer_kv_transfer` through `lmcache.device_ops` (its CUDA kernel on a GPU, its
  vectorized torch fallback on CPU), for the layouts it has a format for, when `lmcache` is importable
  (`make bench-kernels` installs it beside the venv); its output is checked against ours before timing.
  Skipped with the reason otherwise (the CPU fallback has no HND layouts).
"""

import argparse
from dataclasses import asdict, dataclass

import torch

from bench.common import Report, emit, measure_together
from kernels import KVLayout, gather_kv, gather_kv_ref, scatter_kv
from kernels.bits import as_int_bits


@dataclass(frozen=True)
class Config:
    layers: int = 32
    heads: int = 8
    head_dim: int = 128
    tokens: int = 256  # one chunk
    cache_tokens: int = 8192  # slots in the paged cache the chunk is drawn from
    block_sizes: tuple[int, ...] = (16, 128)
    layouts: tuple[str, ...] = ("flash_attn", "flashinfer", "flash_attn_hnd", "vllm_cpu")
    orders: tuple[str, ...] = ("contiguous", "blocks", "shuffled")
    dtype: str = "bfloat16"
    repeats: int = 20
    device: str = "auto"
    output: str | None = None


def _caches(layout: KVLayout, cfg: Config, block_size: int, dtype, device):
    sizes = {"2": 2, "NB": cfg.cache_tokens // block_size, "BS": block_size, "H": cfg.heads, "D": cfg.head_dim}
    shape = [sizes[d] for d in layout.dims]
    return [torch.randn(shape, device=device).to(dtype) for _ in range(cfg.layers)]


def _slots(cfg: Config, block_size: int, order: str, device) -> torch.Tensor:
    """contiguous: one request's blocks in order, from the middle of the cache; blocks: whole blocks in a
    random order (a paged request after churn: how an engine hands slots over); shuffled: tokens of random
    blocks in a random order (the worst case: every token its own row)."""
    if order == "contiguous":
        start = (cfg.cache_tokens // 2) // block_size * block_size
        return torch.arange(start, start + cfg.tokens, device=device)
    if order not in ("blocks", "shuffled"):
        raise ValueError(f"--orders: expected contiguous, blocks or shuffled, got {order!r}")
    blocks = torch.randperm(cfg.cache_tokens // block_size, device=device)[: -(-cfg.tokens // block_size)]
    slots = (blocks[:, None] * block_size + torch.arange(block_size, device=device)).reshape(-1)[: cfg.tokens]
    return slots if order == "blocks" else slots[torch.randperm(cfg.tokens, device=device)]


def _contiguous_runs(caches, staging):
    """(source, destination) pairs: per layer and K/V, a contiguous run of the cache as long as its share
    of the staging tensor, from the middle of the cache."""
    runs = []
    for layer, cache in enumerate(caches):
        flat = cache.view(-1)
        for kv, dst in enumerate(staging[layer].unbind(0)):
            n = dst.numel()
            start = (flat.numel() // 2 + kv * n) % max(flat.numel() - n, 1)
            runs.append((flat[start:start + n].view(dst.shape), dst))
    return runs


def _check_against_reference(caches, slots, layout, staging) -> None:
    """Before timing: `staging` (from `gather_kv`: Triton on a GPU) equals the torch reference's gather, and
    `scatter_kv` of changed values lands them (read back by the reference); then the caches are restored."""
    if not torch.equal(as_int_bits(gather_kv_ref(caches, slots, layout)), as_int_bits(staging)):
        raise AssertionError(f"{layout}: gather_kv differs from gather_kv_ref")
    changed = (as_int_bits(staging) ^ 1).view(staging.dtype)  # every element changed, bit patterns only
    scatter_kv(changed, caches, slots, layout)
    landed = torch.equal(as_int_bits(gather_kv_ref(caches, slots, layout)), as_int_bits(changed))
    scatter_kv(staging, caches, slots, layout)
    if not landed:
        raise AssertionError(f"{layout}: scatter_kv did not write what gather_kv_ref reads back")


def _naive_gather(caches, slots, layout, out):
    """Per-layer advanced indexing through the canonical [KV, NB, BS, H, D] view."""
    bs = layout.canonical(caches[0]).shape[2]
    blocks, offsets = slots // bs, slots % bs
    for layer, cache in enumerate(caches):
        out[layer] = layout.canonical(cache)[:, blocks, offsets]


def _naive_scatter(staging, caches, slots, layout):
    bs = layout.canonical(caches[0]).shape[2]
    blocks, offsets = slots // bs, slots % bs
    for layer, cache in enumerate(caches):
        layout.canonical(cache)[:, blocks, offsets] = staging[layer]


# LMCache's name for each of our layouts: per-layer tensors, [2, NB, BS, H, D] and so on.
_LMCACHE_FORMATS = {"flash_attn": "NL_X_TWO_NB_BS_NH_HS", "flashinfer": "NL_X_NB_TWO_BS_NH_HS",
                    "flash_attn_hnd": "NL_X_TWO_NB_NH_BS_HS"}


def _lmcache_fns(name: str, block_size: int, caches, slots, staging) -> tuple[dict, str | None]:
    """LMCache's gather and scatter of the same slots ({} and why not, where it cannot run). LMCache's
    staging is [2, L, N, H*D]; its gather is checked byte for byte against ours before it is timed."""
    try:
        import lmcache
        from lmcache.lmcache_native import EngineKVFormat, TransferDirection
        transfer = lmcache.device_ops.multi_layer_kv_transfer
    except Exception as e:  # any import failure means: not runnable here
        return {}, f"lmcache not importable ({type(e).__name__}: {e})"
    if name not in _LMCACHE_FORMATS:
        return {}, f"lmcache has no format for {name}"
    fmt = getattr(EngineKVFormat, _LMCACHE_FORMATS[name])
    device = caches[0].device
    ptrs = torch.tensor([c.data_ptr() for c in caches], dtype=torch.int64, device=device)
    layers, num_kv, tokens, heads, head_dim = staging.shape
    theirs = torch.zeros(num_kv, layers, tokens, heads * head_dim, dtype=staging.dtype, device=device)
    slots_per_layer = caches[0].numel() // (num_kv * heads * head_dim)

    def run(direction):
        transfer(theirs, ptrs, slots, device, slots_per_layer, direction, fmt, block_size=block_size,
                 head_size=head_dim)

    try:
        run(TransferDirection.D2H)
    except NotImplementedError as e:
        return {}, f"lmcache cannot move {name} here ({e})"
    ours = staging.permute(1, 0, 2, 3, 4).reshape(theirs.shape)
    if not torch.equal(as_int_bits(theirs), as_int_bits(ours)):
        raise AssertionError(f"lmcache's gather of {name} differs from ours: the baseline moves other bytes")
    return {"lmcache_gather": lambda: run(TransferDirection.D2H),
            "lmcache_scatter": lambda: run(TransferDirection.H2D)}, None


def run(cfg: Config) -> Report:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    dtype = getattr(torch, cfg.dtype)
    report = Report("kernels", asdict(cfg))
    lmcache_skipped = []
    for name in cfg.layouts:
        layout = KVLayout.from_name(name)
        for block_size in cfg.block_sizes:
            caches = _caches(layout, cfg, block_size, dtype, device)
            for order in cfg.orders:
                slots = _slots(cfg, block_size, order, device)
                staging = gather_kv(caches, slots, layout)
                _check_against_reference(caches, slots, layout, staging)
                moved = 2 * staging.numel() * staging.element_size()  # read + write
                flat_src = torch.empty_like(staging)
                runs = _contiguous_runs(caches, staging)
                lmcache, why = _lmcache_fns(name, block_size, caches, slots, staging)
                if why and why not in lmcache_skipped:
                    lmcache_skipped.append(why)
                copy = ((lambda: staging.copy_(flat_src)) if device.type == "cuda"
                        else (lambda: [dst.copy_(src) for src, dst in runs]))
                results = measure_together({
                    "copy": copy,
                    "copy_hot": lambda: staging.copy_(flat_src),
                    "gather": lambda: gather_kv(caches, slots, layout, out=staging, validate=False),
                    "scatter": lambda: scatter_kv(staging, caches, slots, layout, validate=False),
                    "naive_gather": lambda: _naive_gather(caches, slots, layout, staging),
                    "naive_scatter": lambda: _naive_scatter(staging, caches, slots, layout),
                    **lmcache,
                }, repeats=cfg.repeats, device=device)
                gbps = {k: t.rate(moved) / 1e9 for k, t in results.items()}
                report.rows.append({
                    "layout": name, "block_size": block_size, "order": order, "MB_moved": moved / 1e6,
                    **{f"{k}_GBps": v for k, v in gbps.items()},
                    "gather_vs_copy": gbps["gather"] / gbps["copy"],
                    "scatter_vs_copy": gbps["scatter"] / gbps["copy"],
                    "gather_vs_naive": gbps["gather"] / gbps["naive_gather"],
                    "scatter_vs_naive": gbps["scatter"] / gbps["naive_scatter"],
                    **({"gather_vs_lmcache": gbps["gather"] / gbps["lmcache_gather"],
                        "scatter_vs_lmcache": gbps["scatter"] / gbps["lmcache_scatter"]} if lmcache else {}),
                    "timings": {k: asdict(t) for k, t in results.items()},
                })
    report.notes += [f"lmcache baseline skipped: {why}" for why in lmcache_skipped]
    return report


def main(argv=None) -> Report:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Config()
    p.add_argument("--layers", type=int, default=defaults.layers)
    p.add_argument("--heads", type=int, default=defaults.heads)
    p.add_argument("--head-dim", type=int, default=defaults.head_dim)
    p.add_argument("--tokens", type=int, default=defaults.tokens)
    p.add_argument("--cache-tokens", type=int, default=defaults.cache_tokens)
    p.add_argument("--block-sizes", type=lambda s: tuple(int(x) for x in s.split(",")), default=defaults.block_sizes)
    p.add_argument("--layouts", type=lambda s: tuple(s.split(",")), default=defaults.layouts)
    p.add_argument("--orders", type=lambda s: tuple(s.split(",")), default=defaults.orders)
    p.add_argument("--dtype", default=defaults.dtype)
    p.add_argument("--repeats", type=int, default=defaults.repeats)
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--quick", action="store_true", help="8 layers, 10 repeats: a smoke run in seconds")
    p.add_argument("--output", default=None, help="write the JSON report here")
    args = vars(p.parse_args(argv))
    if args.pop("quick"):
        args.update(layers=8, repeats=10)
    cfg = Config(**args)
    report = run(cfg)
    return emit(report, ["layout", "block_size", "order", "MB_moved", "copy_GBps", "copy_hot_GBps", "gather_GBps",
                         "scatter_GBps", "naive_gather_GBps", "naive_scatter_GBps", "gather_vs_copy",
                         "scatter_vs_copy", "gather_vs_naive", "scatter_vs_naive", "lmcache_gather_GBps",
                         "lmcache_scatter_GBps", "gather_vs_lmcache", "scatter_vs_lmcache"], cfg.output)


if __name__ == "__main__":
    main()
