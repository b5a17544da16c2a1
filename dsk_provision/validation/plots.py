"""PNG plots for the validation report: all-reduce busbw against message size.

matplotlib is imported here, lazily, with the Agg backend: no display is needed and the
CLI does not pay for the import unless a report is drawn.
"""

from __future__ import annotations

import io
from pathlib import Path

from dsk_provision.files import write_private


def busbw_series(bench: dict | None) -> list[tuple[int, float]]:
    """(size, busbw GB/s) per size: the better of out-of-place and in-place."""
    out = []
    for row in (bench or {}).get("results") or []:
        out.append((int(row["size"]), max(row["out_of_place"]["busbw_gbs"],
                                          row["in_place"]["busbw_gbs"])))
    return out


def plot_busbw(series: dict[str, list[tuple[int, float]]], path: Path, *,
               title: str = "all-reduce bus bandwidth") -> Path | None:
    """One line per test (label -> points); None when there is nothing to draw."""
    series = {label: pts for label, pts in series.items() if pts}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    try:
        for label, points in series.items():
            sizes, values = zip(*sorted(points), strict=True)
            ax.plot(sizes, values, marker="o", markersize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("busbw (GB/s)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        write_private(Path(path), buf.getvalue())
    finally:
        plt.close(fig)
    return path
