"""Loss curves of a training run as a PNG (for the stage's artifacts, the report and Prefect)."""

from __future__ import annotations

import pyarrow as pa

from pipelines.views import figure_png, pyplot

LOSS_COLUMNS = ("objective", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss")
SCHEDULE_COLUMNS = ("lr", "teacher_temp", "momentum")
FIGURE_SIZE = (10, 3.6)
DPI = 110


def loss_curve_png(metrics: pa.Table, title: str) -> bytes:
    """Loss terms per step (left) and the schedules scaled to their maxima (right)."""
    plt = pyplot()

    steps = metrics.column("step").to_numpy()
    figure, (losses, schedules) = plt.subplots(1, 2, figsize=FIGURE_SIZE)
    for name in LOSS_COLUMNS:
        losses.plot(steps, metrics.column(name).to_numpy(), label=name, linewidth=1.2)
    losses.set(xlabel="step", ylabel="loss", title=title)
    losses.legend(fontsize="small")
    for name in SCHEDULE_COLUMNS:
        values = metrics.column(name).to_numpy()
        peak = max(abs(values).max(), 1e-12)
        schedules.plot(steps, values / peak, label=f"{name} / {peak:.3g}", linewidth=1.2)
    schedules.set(xlabel="step", title="schedules (scaled to their maxima)")
    schedules.legend(fontsize="small")
    return figure_png(figure, DPI)
