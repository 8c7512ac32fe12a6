"""Options: every setting of a run in one frozen dataclass that validates itself once.

The CLI builds its flags from these fields (their `Flag`), [tool.gradcheck] fills them through those flags,
and the Python API takes them as keyword arguments: `gradcheck_cli.analyze(model, batch, steps=5)`. No torch
here, so `gradcheck --help` stays fast.

Groups say who takes a field: "run" settings shape the passes (analyze() and analyze_target() take them),
"source" fields say what to load (analyze_target() and the CLI), "output" fields where the report goes (the
CLI).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradcheck_cli.diagnose.thresholds import Thresholds
from gradcheck_cli.errors import UserError
from gradcheck_cli.kinds import DEFAULT_FAIL_ON, KINDS, SEVERITIES

DEFAULT_BATCH_SIZE = 32
AMP_CHOICES = ("bf16", "fp16")
PARALLEL_CHOICES = ("ddp", "fsdp")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
FORMAT_CHOICES = ("table", "json", "markdown", "junit")
LAYERS_CHOICES = ("folded", "flagged", "all")
OPTIMIZER_CHOICES = ("sgd", "momentum", "adam", "adamw")
TASK_CHOICES = ("causal-lm", "seq-cls", "masked-lm", "seq2seq", "image-cls")


@dataclass(frozen=True)
class Flag:
    """How a field appears on the command line."""

    names: tuple[str, ...]  # the long name first: it is also the [tool.gradcheck] key
    help: str
    choices: tuple[str, ...] | None = None
    negative: str | None = None  # a boolean's "off" flag, e.g. --no-strict
    cli_default: str | None = None  # where the command line's default differs from the API's


def option(default: Any, group: str, *names: str, help: str = "", **flag: Any) -> Any:
    """A field of Options: its default, its group, and its flag (none when `names` is empty)."""
    meta = {"group": group, "flag": Flag(names, help, **flag) if names else None}
    if isinstance(default, Thresholds | tuple):
        return dataclasses.field(default_factory=lambda: default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Options:
    """Every option of `gradcheck analyze`; see the README for what each one does."""

    # -- what to load (TARGET itself is an argument, not an option) --
    model_name: str | None = option(None, "source", "--model", "-m", help="NAME of the model in TARGET.")
    weights: str | None = option(None, "source", "--weights", "-w", help="Load parameters from a .safetensors file.")
    strict: bool = option(
        True,
        "source",
        "--strict",
        negative="--no-strict",
        help="Require weights to match every key (--no-strict: partial).",
    )
    allow_pickle: bool = option(
        False, "source", "--allow-pickle", help="Allow .pt/.bin/.ckpt weights (torch.load weights_only=True)."
    )
    data: str | None = option(
        None,
        "source",
        "--data",
        "-d",
        help="FILE.safetensors (inputs[, targets]), FILE.py:FN, randn:B,D1,..., randint:HIGH:B,T, or FILE.txt (hf:).",
    )
    task: str | None = option(
        None,
        "source",
        "--task",
        help="hf: TARGET's task head when config.json names none (or to choose another).",
        choices=TASK_CHOICES,
    )
    from_config: bool = option(
        False, "source", "--from-config", help="hf: TARGET: build the architecture at random init, load no weights."
    )
    adapter: str | None = option(
        None, "source", "--adapter", help="hf: TARGET: load a PEFT adapter (LoRA...) from DIR onto the model."
    )
    batch_size: int = option(DEFAULT_BATCH_SIZE, "run", "--batch-size", "-b", help="Batch size for .safetensors data.")
    loss: str = option("auto", "source", "--loss", help="auto, cross-entropy, mse or FILE.py:FN.")
    # -- the passes --
    steps: int = option(3, "run", "--steps", help="Batches to measure: one forward and backward each.")
    train_steps: int = option(
        0,
        "run",
        "--train-steps",
        help="Optimizer steps to take, and watch, before measuring (0: measure at init).",
    )
    optimizer: str | None = option(
        None,
        "run",
        "--optimizer",
        help="--train-steps' optimizer: sgd, momentum, adam, adamw or FILE.py:FN (default: the model file's "
        "build_optimizer, else sgd).",
    )
    lr: float = option(0.01, "run", "--lr", help="Learning rate for --train-steps; also scales the update-size check.")
    weight_decay: float | None = option(
        None, "run", "--weight-decay", help="Weight decay for --optimizer (default: the optimizer's own)."
    )
    clip: float | None = option(
        None, "run", "--clip", help="--train-steps: clip the gradient norm to NORM (clip_grad_norm_)."
    )
    save_bad_batch: Path | None = option(
        None,
        "run",
        "--save-bad-batch",
        help="--train-steps: save the batch whose step gave NaN/Inf (and the weights before it) to FILE.safetensors.",
    )
    seed: int = option(0, "run", "--seed", help="Seed for random data, dropout and projections.")
    device: str | None = option(
        None, "run", "--device", help="auto picks cuda when available.", choices=DEVICE_CHOICES, cli_default="auto"
    )
    eval_mode: bool = option(False, "run", "--eval", help="Run in eval mode (default: train mode).")
    amp: str | None = option(
        None,
        "run",
        "--amp",
        help="Mixed precision: passes under torch.autocast (fp16 with GradScaler's loss scale).",
        choices=AMP_CHOICES,
    )
    parallel: str | None = option(
        None,
        "run",
        "--parallel",
        help="Under torchrun: wrap in DistributedDataParallel (ddp) or FSDP2 (fsdp).",
        choices=PARALLEL_CHOICES,
    )
    thresholds: Thresholds = option(Thresholds(), "run")  # flags: one per Thresholds field
    value_histograms: bool = option(False, "run")  # the signed-value histograms that plots and TensorBoard draw
    # the folder relative output paths are taken from, fixed before any user code runs (a model file that
    # calls os.chdir must not move the report); None: the working directory when the file is written
    base: Path | None = option(None, "run")
    save_grads: Path | None = option(
        None, "run", "--save-grads", help="Save every measured gradient, per step and layer, to FILE.safetensors."
    )
    # -- where the report goes --
    format: str = option(
        "table",
        "output",
        "--format",
        "-f",
        help="table (for people), json, markdown (job summaries) or junit (XML).",
        choices=FORMAT_CHOICES,
    )
    layers: str = option(
        "folded",
        "output",
        "--layers",
        help="Table rows: folded (repeated blocks in one row, flagged layers always alone), flagged, or all.",
        choices=LAYERS_CHOICES,
    )
    output: Path | None = option(
        None,
        "output",
        "--output",
        "-o",
        help="Also write the report here: JSON for .json, Markdown for .md, JUnit XML for .xml, text else.",
    )
    fail_on: tuple[str, ...] = option(
        DEFAULT_FAIL_ON,
        "output",
        "--fail-on",
        help=f"Finding kinds that fail the run (comma list of {', '.join(KINDS)}).",
    )
    fail_level: str = option(
        "error", "output", "--fail-level", help="Lowest severity that fails the run.", choices=("error", "warning")
    )
    plot: Path | None = option(
        None,
        "output",
        "--plot",
        help="Draw the gradient-flow figure and per-layer histograms to FILE.png or FILE.svg (needs matplotlib).",
    )
    tensorboard: Path | None = option(
        None,
        "output",
        "--tensorboard",
        help="Write per-layer gradient histograms and norms as TensorBoard events into DIR (needs tensorboard).",
    )
    quiet: bool = option(False, "output", "--quiet", "-q", help="No progress output on stderr.")

    def __post_init__(self) -> None:
        if self.thresholds is None:  # the API's thresholds=None: the defaults
            object.__setattr__(self, "thresholds", Thresholds())
        if isinstance(self.fail_on, str):
            object.__setattr__(self, "fail_on", parse_fail_on(self.fail_on))
        _check_at_least(self.steps, 1, "--steps", "use --steps 1 or more")
        _check_at_least(self.batch_size, 1, "--batch-size", "use e.g. --batch-size 32")
        if self.train_steps < 0:
            raise UserError(f"train steps must be 0 or more, got {self.train_steps}", "use --train-steps 0 or more")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise UserError(f"learning rate must be a positive number, got {self.lr}", "use e.g. --lr 0.01")
        if self.weight_decay is not None and not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(
                f"--weight-decay must be 0 or more, got {self.weight_decay}", "use e.g. --weight-decay 0.01"
            )
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise UserError(f"--clip must be a positive norm, got {self.clip}", "use e.g. --clip 1.0")
        if self.optimizer is not None and self.optimizer not in OPTIMIZER_CHOICES and ":" not in self.optimizer:
            raise UserError(
                f"unknown --optimizer '{self.optimizer}'", f"use {', '.join(OPTIMIZER_CHOICES)} or FILE.py:FN"
            )
        for name, choices in (
            ("amp", AMP_CHOICES),
            ("parallel", PARALLEL_CHOICES),
            ("format", FORMAT_CHOICES),
            ("layers", LAYERS_CHOICES),
            ("task", TASK_CHOICES),
        ):
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise UserError(f"unknown --{name} '{value}'", f"use {' or '.join(choices)}")
        if self.fail_level not in SEVERITIES:
            raise UserError(f"unknown --fail-level '{self.fail_level}'", "use error or warning")
        if self.save_grads is not None and self.parallel is not None:
            raise UserError("--save-grads does not work with --parallel yet", "run it in one process, without torchrun")

    def located(self, path: Path) -> Path:
        """Where an output path given by the user is written: relative to `base`, not to a moved cwd."""
        return path if path.is_absolute() or self.base is None else self.base / path

    @property
    def wants_value_histograms(self) -> bool:
        """The tutorial's signed-value histograms cost measurement time: only the picture outputs want them."""
        return self.value_histograms or self.plot is not None or self.tensorboard is not None

    @classmethod
    def of(cls, groups: tuple[str, ...], settings: Mapping[str, Any], caller: str) -> Options:
        """Options from keyword arguments, refusing names the caller does not take (a typo is an error)."""
        known = {item.name for item in dataclasses.fields(cls) if item.metadata["group"] in groups}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(
                f"{caller}() got unexpected option(s) {', '.join(unknown)}; it takes {', '.join(sorted(known))}"
            )
        return cls(**settings)

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> Options:
        """Options from the command line's values by field name, threshold fields included (flat)."""
        threshold_names = {item.name for item in dataclasses.fields(Thresholds)}
        thresholds = Thresholds(**{k: v for k, v in values.items() if k in threshold_names})
        return cls(thresholds=thresholds, **{k: v for k, v in values.items() if k not in threshold_names})


def parse_fail_on(text: str) -> tuple[str, ...]:
    """--fail-on's comma list, checked against the kinds there are."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UserError(f"unknown --fail-on kind(s): {', '.join(unknown)}", f"choose from {', '.join(KINDS)}")
    return kinds


def _check_at_least(value: int, least: int, flag: str, hint: str) -> None:
    if value < least:
        raise UserError(f"{flag} must be at least {least}, got {value}", hint)


def flags() -> list[tuple[str, Any, Flag]]:
    """(field name, default, flag) of every option the command line has: Options' fields, then the
    thresholds (--signal-warning ...), in the order --help lists them."""
    found = []
    for item in dataclasses.fields(Options):
        flag = item.metadata["flag"]
        factory: Any = item.default_factory
        default = item.default if item.default is not dataclasses.MISSING else factory()
        if flag is not None:
            found.append((item.name, default if flag.cli_default is None else flag.cli_default, flag))
    for item in dataclasses.fields(Thresholds):
        found.append((item.name, item.default, Flag(("--" + item.name.replace("_", "-"),), item.metadata["help"])))
    return found
