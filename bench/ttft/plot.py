"""`--plot`: the report's TTFT per scenario as a horizontal bar chart (PNG, matplotlib)."""

import os

SMOLLM2 = "SmolLM2-135M-Instruct"


def model_name(model: str) -> str:
    """The name a reader knows the model by: SmolLM2-135M-Instruct for bench.models' converted checkpoint,
    a local checkpoint's folder name, else the name as given (e.g. a hub name)."""
    from bench.models import DEFAULT_DIR

    path = os.path.realpath(model)
    if path == os.path.realpath(DEFAULT_DIR):
        return SMOLLM2
    return os.path.basename(path.rstrip(os.sep)) if os.path.isdir(model) else model


def plot(rows: list[dict], path: str, title: str) -> str:
    """Write the chart to `path`; returns the note for the report (where it went, or why it did not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plot: matplotlib is not importable here (pip install matplotlib); {path} not written"
    ok = [r for r in rows if r.get("ttft_mean_s")]
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.45 * len(ok)))
    names = [r["scenario"] for r in ok][::-1]
    p50 = [r["ttft_p50_s"] for r in ok][::-1]
    err = [[0] * len(ok), [max(r["ttft_p90_s"] - m, 0) for m, r in zip(p50, ok[::-1])]]
    colors = ["tab:green" if n.startswith("ours") else "tab:gray" if n.startswith(("recompute", "server-cold"))
              else "tab:blue" for n in names]
    ax.barh(names, p50, xerr=err, color=colors)
    for y, r in enumerate(ok[::-1]):
        speedup = f" ({r['speedup']:.1f}x)" if r.get("speedup") else ""
        ax.text(r["ttft_p90_s"], y, f"  {r['ttft_p50_s']:.3g}s{speedup}", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(right=4 * max(r["ttft_p90_s"] for r in ok))
    ax.set_xlabel("TTFT, seconds (bar: median; whisker: to p90; log scale)")
    ax.set_title(title, fontsize=9)
    others = [f"{r['scenario']}: {r['status']}" for r in rows if not r.get("ttft_mean_s")]
    if others:
        fig.text(0.01, 0.01, "not measured: " + ", ".join(others), fontsize=7)
    fig.tight_layout(rect=(0, 0.04 if others else 0, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # `make demo` on a fresh clone: no results/
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"
