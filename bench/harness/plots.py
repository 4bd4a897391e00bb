"""What every scenario's PNG plot shares (matplotlib, optional): the backend, the title with the
run's provenance, saving. Each scenario draws its own plot (its `plot(run, png)`); a plot
described as Panels (live-converge's) is drawn both as a PNG and, without matplotlib, as an SVG."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any

NO_MATPLOTLIB = "plots skipped: matplotlib not installed"


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


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


def bar_groups(ax: Any, groups: list[Any], series: list[str], value: Any, colors: Any,
               capsize: int = 3, fontsize: int = 7, ytext: int = 2) -> None:
    """Bars side by side per group, a color per series: value(group, series) is None (no bar)
    or (height, low whisker, high whisker, label above it, ytext points up)."""
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
                ax.annotate(text, (x, y + top), textcoords="offset points", xytext=(0, ytext),
                            ha="center", fontsize=fontsize)


# ---------------------------------------------------------------- one description, two drawings

@dataclass
class Series:
    """Points of one kind in a panel. marker: "o" (filled), "D" (an open diamond), "x" or ""
    (none); line: "-" or "--" joins the points ("" none); band: a fill of ±band × y around the
    line (the bar's tolerance)."""
    label: str | None
    points: list[tuple[float, float]]
    color: str
    marker: str = "o"
    line: str = ""
    band: float = 0.0


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    xticks: list[float] = field(default_factory=list)
    xlog: bool = False  # base 2
    ylog: bool = False  # base 10
    hline: tuple[float, str] | None = None  # (y, label): a limit drawn across


def draw_png(panels: list[Panel], png: str, suptitle: str) -> None:
    """The panels side by side with matplotlib."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6), squeeze=False)
    for ax, p in zip(axes[0], panels):
        for s in p.series:
            if not s.points:
                continue
            xs, ys = zip(*s.points)
            if s.line:
                ax.plot(xs, ys, s.line, color=s.color, alpha=0.6, label=s.label if not s.marker
                        else None)
            if s.band:
                ax.fill_between(xs, [y * (1 - s.band) for y in ys],
                                [y * (1 + s.band) for y in ys], color=s.color, alpha=0.12)
            if s.marker:
                ax.scatter(xs, ys, marker=s.marker, label=s.label, zorder=3,
                           **({"facecolors": "none", "edgecolors": s.color} if s.marker == "D"
                              else {"color": s.color}))
        if p.hline:
            ax.axhline(p.hline[0], color="#d62728", linestyle=":", label=p.hline[1])
        if p.xlog:
            ax.set_xscale("log", base=2)
        if p.ylog:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        if p.xticks:
            ax.set_xticks(p.xticks, [f"{x:g}" for x in p.xticks])
        ax.set_title(p.title, fontsize=10)
        ax.set_xlabel(p.xlabel)
        ax.set_ylabel(p.ylabel)
        ax.grid(alpha=0.3)
        if any(s.label and s.points for s in p.series) or p.hline:
            ax.legend(fontsize=8)
    save(plt, fig, png, suptitle)


def _esc(t: str) -> str:
    return t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    """Decades on a log axis; on a linear one 1, 2, 2.5 or 5 times a power of ten, ~5 steps."""
    if log:
        return [10.0 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
    e = 10 ** math.floor(math.log10(hi / 5))
    step = next(m * e for m in (1, 2, 2.5, 5, 10) if m * e >= hi / 5)
    return [k * step for k in range(int(hi / step + 1e-9) + 1)]


def _scale(lo: float, hi: float, log: bool, base: float) -> Any:
    """Data to 0..1 along an axis from lo to hi (log: by the logarithm)."""
    f = (lambda v: math.log(max(v, lo), base)) if log else (lambda v: v)
    return lambda v: (f(v) - f(lo)) / ((f(hi) - f(lo)) or 1)


def draw_svg(panels: list[Panel], title: str) -> str:
    """The panels side by side as an SVG drawn by hand: no matplotlib needed."""
    PW, PH, L, T, GAP = 330, 280, 70, 70, 90
    W = L + len(panels) * (PW + GAP)
    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="420" '
          'font-family="sans-serif" font-size="12">',
          f'<rect width="{W}" height="420" fill="white"/>',
          f'<text x="{W / 2}" y="24" text-anchor="middle" font-size="15">{_esc(title)}</text>']
    for i, p in enumerate(panels):
        x0, y0 = L + i * (PW + GAP), T
        pts = [pt for s in p.series for pt in s.points]
        xs = p.xticks or [x for x, _ in pts] or [0.0, 1.0]
        ys = [y * (1 + s.band) for s in p.series for _, y in s.points] + (
            [p.hline[0]] if p.hline else [])
        ys = [y for y in ys if y > 0] or [1.0]
        xlo, xhi = (min(xs) / 1.5, max(xs) * 1.5) if p.xlog else (min(xs) - 0.5, max(xs) + 0.5)
        decades = _ticks(min(ys), max(ys), True)
        ylo, yhi = (decades[0], decades[-1]) if p.ylog else (0.0, max(ys) * 1.1)
        fx, fy = _scale(xlo, xhi, p.xlog, 2), _scale(ylo, yhi, p.ylog, 10)

        def X(v: float) -> float:
            return x0 + PW * fx(v)  # noqa: B023  (drawn before the next panel)

        def Y(v: float) -> float:
            return y0 + PH - PH * fy(v)  # noqa: B023

        el.append(f'<rect x="{x0}" y="{y0}" width="{PW}" height="{PH}" fill="none" stroke="#444"/>')
        el.append(f'<text x="{x0 + PW / 2}" y="{y0 - 10}" text-anchor="middle" '
                  f'font-weight="bold">{_esc(p.title)}</text>')
        el.append(f'<text x="{x0 + PW / 2}" y="{y0 + PH + 36}" text-anchor="middle">'
                  f'{_esc(p.xlabel)}</text>')
        el.append(f'<text transform="translate({x0 - 48},{y0 + PH / 2}) rotate(-90)" '
                  f'text-anchor="middle">{_esc(p.ylabel)}</text>')
        for v in (decades if p.ylog else _ticks(ylo, yhi, False)):
            el.append(f'<line x1="{x0}" x2="{x0 + PW}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" '
                      f'stroke="#ddd"/><text x="{x0 - 6}" y="{Y(v) + 4:.1f}" '
                      f'text-anchor="end">{v:g}</text>')
        for v in p.xticks:
            el.append(f'<text x="{X(v):.1f}" y="{y0 + PH + 16}" text-anchor="middle">{v:g}</text>')
        if p.hline:
            el.append(f'<line x1="{x0}" x2="{x0 + PW}" y1="{Y(p.hline[0]):.1f}" '
                      f'y2="{Y(p.hline[0]):.1f}" stroke="#c00" stroke-dasharray="6 4"/>')
        legend = [(s.label, s.color) for s in p.series if s.label and s.points]
        legend += [(p.hline[1], "#c00")] if p.hline else []
        for k, (label, color) in enumerate(legend):
            el.append(f'<text x="{x0 + 6}" y="{y0 + 14 + 14 * k}" fill="{color}">'
                      f'{_esc(label)}</text>')
        for s in p.series:
            at = [(X(x), Y(y)) for x, y in s.points]
            if s.band:
                poly = [(X(x), Y(y * (1 + s.band))) for x, y in s.points] + [
                    (X(x), Y(y * (1 - s.band))) for x, y in reversed(s.points)]
                el.append(f'<polygon points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in poly)}" '
                          f'fill="{s.color}" opacity="0.12"/>')
            if s.line:
                dash = ' stroke-dasharray="4 3"' if s.line == "--" else ""
                el.append(f'<polyline fill="none" stroke="{s.color}" stroke-width="1.5"{dash} '
                          f'points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in at)}"/>')
            for a, b in at:
                if s.marker == "o":
                    el.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3.5" fill="{s.color}"/>')
                elif s.marker == "D":
                    el.append(f'<polygon points="{a:.1f},{b - 5:.1f} {a + 5:.1f},{b:.1f} '
                              f'{a:.1f},{b + 5:.1f} {a - 5:.1f},{b:.1f}" fill="white" '
                              f'stroke="{s.color}" stroke-width="1.5"/>')
                elif s.marker == "x":
                    el.append(f'<text x="{a:.1f}" y="{b + 5:.1f}" text-anchor="middle" '
                              f'fill="{s.color}" font-size="16">×</text>')
    return "\n".join(el + ["</svg>"]) + "\n"
