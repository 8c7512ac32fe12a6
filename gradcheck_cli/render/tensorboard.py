"""--tensorboard DIR: the report as TensorBoard events, the way the tutorial inspected gradients.

Written from the report alone (torch.utils.tensorboard.SummaryWriter, tensorboard an optional extra):
- histograms `gradients/<layer>`: the layer's gradient values in each step (Layer.value_histograms);
- scalars `grad_norm/<layer>`, `output_grad_norm/<layer>` (‖dL/dz‖), `grad_to_weight/<layer>` and `loss`;
- text `gradcheck/report`: the Markdown report, findings and fixes included;
- after --train-steps, each watched step: scalars `train/loss`, `train/grad_norm` (before clipping),
  `train/clipped`, `train/lr`, `train/loss_scale` (fp16), per layer `train_grad_norm/<layer>`,
  `train_update_ratio/<layer>` (‖ΔW‖/‖W‖) and `train_dead_fraction/<layer>`; and the histogram
  `train/log10_update_ratio`: how the update sizes spread over the layers in that step.
TensorBoard's step is the training step: the watched steps first, then the measurement steps after them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradcheck_cli.errors import UserError
from gradcheck_cli.render.common import display_name
from gradcheck_cli.report import Report, Training, ValueHistogram

INSTALL_HINT = 'pip install "gradcheck-cli[tensorboard]"'


def check(directory: Path) -> None:
    """Refuse a bad --tensorboard before any pass runs: a file in the way, tensorboard not installed."""
    if directory.exists() and not directory.is_dir():
        raise UserError(
            f"--tensorboard {directory} is a file", "give a folder for the event files, e.g. runs/gradcheck"
        )
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise UserError("--tensorboard needs tensorboard", INSTALL_HINT) from None


def write(report: Report, directory: Path, markdown: str) -> None:
    """Write the event file into `directory` (created if needed)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(directory))
    try:
        first = report.training.steps if report.training is not None else report.train_steps
        for step, loss in enumerate(report.loss):
            writer.add_scalar("loss", loss, first + step)
        for layer in report.layers:
            name = display_name(layer)
            for tag, values in (
                ("grad_norm", layer.grad_norm_steps),
                ("output_grad_norm", layer.output_grad_norm_steps),
                ("grad_to_weight", layer.grad_to_weight_steps),
            ):
                for step, value in enumerate(values):
                    if value is not None:
                        writer.add_scalar(f"{tag}/{name}", value, first + step)
            for histogram in layer.value_histograms or ():
                raw = raw_histogram(histogram)
                if raw is not None:
                    writer.add_histogram_raw(f"gradients/{name}", global_step=first + histogram.step, **raw)
        if report.training is not None:
            _training(writer, report.training)
        writer.add_text("gradcheck/report", markdown, first)
    finally:
        writer.close()


UPDATE_BINS = 30  # log10 ||dW||/||W|| from 1e-9 to 1e+1, three bins per decade


def _training(writer: Any, run: Training) -> None:
    import math

    for step in range(run.steps):
        for tag, value in (
            ("train/loss", run.loss[step]),
            ("train/grad_norm", run.grad_norm[step]),
            ("train/clipped", float(run.clipped[step])),
            ("train/lr", run.lr[step]),
            ("train/loss_scale", run.loss_scale[step] if run.loss_scale else None),
        ):
            if value is not None:
                writer.add_scalar(tag, value, step)
        logs = []
        for layer in run.layers:
            name = layer.name or "(model)"
            for tag, values in (
                ("train_grad_norm", layer.grad_norm),
                ("train_update_ratio", layer.update_ratio),
                ("train_dead_fraction", layer.dead_fraction),
            ):
                value = values[step]
                if value is not None:
                    writer.add_scalar(f"{tag}/{name}", value, step)
            ratio = layer.update_ratio[step]
            if ratio is not None and ratio > 0 and math.isfinite(ratio):
                logs.append(math.log10(ratio))
        if logs:
            writer.add_histogram_raw("train/log10_update_ratio", global_step=step, **_log_histogram(logs))


def _log_histogram(values: list[float]) -> dict[str, Any]:
    low, high = -9.0, 1.0
    width = (high - low) / UPDATE_BINS
    counts = [0] * UPDATE_BINS
    for value in values:
        counts[min(UPDATE_BINS - 1, max(0, int((value - low) / width)))] += 1
    return {
        "min": min(values),
        "max": max(values),
        "num": len(values),
        "sum": sum(values),
        "sum_squares": sum(v * v for v in values),
        "bucket_limits": [low + width * (i + 1) for i in range(UPDATE_BINS)],
        "bucket_counts": counts,
    }


def raw_histogram(histogram: ValueHistogram) -> dict[str, Any] | None:
    """The summary TensorBoard's histogram proto holds, from fixed bins: bucket_limits are right edges; the
    moments are taken at the bin centres. None for an empty or non-finite histogram."""
    import math

    if not math.isfinite(histogram.limit) or not any(histogram.counts):
        return None
    edges = histogram.edges()
    if histogram.limit == 0:  # every gradient exactly 0
        edges = [-1e-12 + 2e-12 * i / len(histogram.counts) for i in range(len(histogram.counts) + 1)]
    used = [i for i, count in enumerate(histogram.counts) if count]
    centres = [(edges[i] + edges[i + 1]) / 2 for i in range(len(histogram.counts))]
    return {
        "min": edges[used[0]],
        "max": edges[used[-1] + 1],
        "num": sum(histogram.counts),
        "sum": sum(c * x for c, x in zip(histogram.counts, centres, strict=True)),
        "sum_squares": sum(c * x * x for c, x in zip(histogram.counts, centres, strict=True)),
        "bucket_limits": edges[1:],
        "bucket_counts": list(histogram.counts),
    }
