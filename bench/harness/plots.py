"""What every scenario's PNG plot shares (matplotlib, optional): the backend, the title with the
run's provenance, saving. Each scenario draws its own plot (its `plot(run, png)`)."""

from __future__ import annotations

from typing import Any

NO_MATPLOTLIB = "plots skipped: matplotlib not installed"


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401  (only whether it is there)
    except ImportError:
        return False
    return True


def pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def title(run: Any, what: str) -> str:
    p = run.provenance
    return (f"{run.scenario}: {what}\nengine {p.get('engine_commit', '?')}, "
            f"{p.get('cpu_model', '?')} × {p.get('nproc', '?')}, kernel {p.get('kernel', '?')}")


def save(plt: Any, fig: Any, png: str, suptitle: str) -> None:
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def bar_groups(ax: Any, groups: list[str], series: list[str], value: Any, colors: Any,
               capsize: int = 3, fontsize: int = 7) -> None:
    """Bars side by side per group, a color per series: value(group, series) is None (no bar)
    or (height, low whisker, high whisker, label above it)."""
    width = 0.8 / max(1, len(series))
    for i, name in enumerate(series):
        xs, ys, lo, hi, labels = [], [], [], [], []
        for j, group in enumerate(groups):
            v = value(group, name)
            if v is None:
                continue
            xs.append(j + (i - (len(series) - 1) / 2) * width)
            ys.append(v[0])
            lo.append(v[1])
            hi.append(v[2])
            labels.append(v[3])
        if not xs:
            continue
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=capsize, label=name, color=colors(i))
        for x, y, top, text in zip(xs, ys, hi, labels):
            if text:  # above the whisker
                ax.annotate(text, (x, y + top), textcoords="offset points", xytext=(0, 2),
                            ha="center", fontsize=fontsize)
