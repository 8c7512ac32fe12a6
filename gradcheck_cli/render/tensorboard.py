"""--tensorboard DIR: the report as TensorBoard events, the way the tutorial inspected gradients.

Written from the report alone (torch.utils.tensorboard.SummaryWriter, tensorboard an optional extra):
- histograms `gradients/<layer>`: the layer's gradient values in each step (Layer.value_histograms);
- scalars `grad_norm/<layer>`, `output_grad_norm/<layer>` (‖dL/dz‖), `grad_to_weight/<layer>` and `loss`;
- text `gradcheck/report`: the Markdown report, findings and fixes included.
TensorBoard's step is the training step: --train-steps taken before measuring, plus the measurement step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradcheck_cli.errors import UserError
from gradcheck_cli.render.common import display_name
from gradcheck_cli.report import Report, ValueHistogram

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
        first = report.train_steps
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
        writer.add_text("gradcheck/report", markdown, first)
    finally:
        writer.close()


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
