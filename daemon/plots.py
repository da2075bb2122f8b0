"""Figures of the product's metrics (matplotlib, Agg backend: no display needed). Library code:
`cryoptycho evaluate` and `cryoptycho demo` draw with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cryoptycho.gpu.metrics import THRESHOLDS, FRCCurve


def plot_frc(curves: dict[str, FRCCurve], path: Path, title: str, pool: int = 3) -> Path:
    """FRC (raw and pooled) with the 1-bit / ½-bit / 0.143 thresholds, and SNR(q), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_f, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for label, curve in curves.items():
        q = curve.freq * 1e-10  # 1/Å
        line = ax_f.plot(q[1:], curve.frc[1:], lw=0.8, alpha=0.5)[0]
        pooled = curve.pooled(pool)
        ax_f.plot(q[1:], pooled.frc[1:], color=line.get_color(), lw=1.8, label=f"{label} (pooled {pool})")
        ax_s.semilogy(q[1:], np.clip(pooled.snr()[1:], 1e-4, None), color=line.get_color(), label=label)
    first = next(iter(curves.values())).pooled(pool)
    q = first.freq * 1e-10
    for thr, style in zip(THRESHOLDS, ("--", ":", "-.")):
        ax_f.plot(q[1:], first.threshold(thr)[1:], "k" + style, lw=0.8, label=thr)
    ax_f.set(xlabel="spatial frequency (1/Å)", ylabel="FRC", ylim=(-0.2, 1.05), title=title)
    ax_s.set(xlabel="spatial frequency (1/Å)", ylabel="SNR = FRC/(1−FRC)", title="SNR(q)")
    ax_f.legend(fontsize=7)
    ax_s.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
