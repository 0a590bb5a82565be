"""Loss and health curves of a training run as PNGs (for the stage's artifacts, the report and Prefect)."""

from __future__ import annotations

import pyarrow as pa

from pipelines.views import figure_png, pyplot
from training.health import HEALTH_COLUMNS

LOSS_COLUMNS = ("objective", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss")
SCHEDULE_COLUMNS = ("lr", "teacher_temp", "momentum")
FIGURE_SIZE = (10, 3.6)
HEALTH_FIGURE_SIZE = (12, 3.0)
# What each health panel shows, and the value a collapsed run tends to (training/health.py).
HEALTH_LABELS = {
    "teacher_entropy": "teacher entropy / log K (collapse: 1)",
    "prototype_usage": "prototypes in use (collapse: near 0)",
    "cls_std": "CLS std x sqrt(D) (collapse: 0)",
    "cls_rank": "CLS effective rank (collapse: 1)",
}
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


def health_curve_png(metrics: pa.Table, title: str) -> bytes:
    """One panel per health signal, per step; a signal the objective does not log is left empty."""
    plt = pyplot()

    steps = metrics.column("step").to_numpy()
    figure, panels = plt.subplots(1, len(HEALTH_COLUMNS), figsize=HEALTH_FIGURE_SIZE)
    for panel, name in zip(panels, HEALTH_COLUMNS, strict=True):
        values = metrics.column(name).to_numpy(zero_copy_only=False)
        if metrics.column(name).null_count < metrics.num_rows:
            panel.plot(steps, values, linewidth=1.2)
        else:
            panel.text(0.5, 0.5, "not logged by\nthis objective", ha="center", va="center")
        panel.set(xlabel="step", title=HEALTH_LABELS[name])
        panel.title.set_fontsize("small")
    figure.suptitle(title)
    figure.tight_layout()
    return figure_png(figure, DPI)
