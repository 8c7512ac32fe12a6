"""The `gradcheck` command: a thin Typer skin over the Python API.

Parses options, calls the API, renders, and maps outcomes to exit codes in one place:
0 no failing finding, 1 a failing finding, 2 bad usage or input, 130 interrupted.
torch is imported only inside commands, so `gradcheck --help` and `--version` start fast.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from gradcheck_cli._version import __version__
from gradcheck_cli.errors import UserError, is_out_of_memory
from gradcheck_cli.report import DEFAULT_FAIL_ON, KINDS

if TYPE_CHECKING:
    from gradcheck_cli.diagnose import Thresholds
    from gradcheck_cli.outputs import Outputs
    from gradcheck_cli.report import Report

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Click's usage error (unknown option, bad --format value), from a public name: typer >= 0.2x bundles click.
_USAGE_ERROR: type[Exception] = typer.BadParameter.__mro__[1]


@contextlib.contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    """A usage mistake ends like every other input error: exit 2 and one line, not Click's usage box."""
    try:
        yield
    except _USAGE_ERROR as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # a bare `gradcheck` prints the help
            raise
        context = getattr(error, "ctx", None)
        command = context.command_path if context is not None else "gradcheck"
        message = str(getattr(error, "format_message", error.__str__)()).rstrip(".")
        typer.echo(f"error: {UserError(message, f'see {command} --help').one_line()}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


class _Group(TyperGroup):
    """Parses with one-line usage errors: the subcommands' options are parsed inside the group's invoke."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _one_line_usage_errors():
            return super().invoke(ctx)


app = typer.Typer(
    name="gradcheck",
    cls=_Group,
    help="Find the layers whose gradients vanish or explode in a PyTorch model. Exit 1 on bad gradients.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Format(str, Enum):
    table = "table"
    json = "json"
    markdown = "markdown"
    junit = "junit"


class CompareFormat(str, Enum):
    table = "table"
    json = "json"
    markdown = "markdown"


class FailLevel(str, Enum):
    error = "error"
    warning = "warning"


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class AmpChoice(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"


class ParallelChoice(str, Enum):
    ddp = "ddp"
    fsdp = "fsdp"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gradcheck {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """gradcheck: per-layer gradient diagnosis for PyTorch models, for people and for CI."""
    if ctx.invoked_subcommand == "analyze":
        with _errors(debug=False):
            _load_config(ctx, "analyze")


def _load_config(ctx: typer.Context, name: str) -> None:
    """[tool.gradcheck] from pyproject.toml becomes the command's defaults (click's default_map), so flags
    given on the command line win and values go through the same parsing as flags."""
    from gradcheck_cli import config

    found = config.find()
    if found is None:
        return
    command = getattr(ctx.command, "get_command")(ctx, name)  # noqa: B009  # click's Group API, typed loosely
    params = list(command.params)
    values = config.defaults(found, config.option_names(params))
    probe = type(ctx)(command, parent=ctx, info_name=name)
    by_name = {param.name: param for param in params}
    for param_name, value in values.items():
        try:
            by_name[param_name].process_value(probe, value)
        except Exception as error:
            key = next(k for k, v in config.option_names(params).items() if v == param_name)
            message = getattr(error, "message", None) or str(error)
            raise UserError(
                f"{found.path}: [tool.gradcheck] {key} = {value!r}: {message}",
                f"give what --{key} takes (gradcheck {name} --help)",
            ) from None
    ctx.default_map = {**(ctx.default_map or {}), name: values}
    ctx.meta["gradcheck.config"] = found.path


# -- options shared by analyze and demo -------------------------------------------------------------------

FormatOption = Annotated[
    Format, typer.Option("--format", "-f", help="table (for people), json, markdown (job summaries) or junit (XML).")
]
OutputOption = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="Also write the report here: JSON for .json, Markdown for .md, JUnit XML for .xml, text else.",
    ),
]
PlotOption = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        help="Draw the gradient-flow figure and per-layer histograms to FILE.png or FILE.svg (needs matplotlib).",
        show_default=False,
    ),
]
TensorBoardOption = Annotated[
    Path | None,
    typer.Option(
        "--tensorboard",
        help="Write per-layer gradient histograms and norms as TensorBoard events into DIR (needs tensorboard).",
        show_default=False,
    ),
]
SaveGradsOption = Annotated[
    Path | None,
    typer.Option(
        "--save-grads",
        help="Save every measured gradient, per step and layer, to FILE.safetensors.",
        show_default=False,
    ),
]
FailOnOption = Annotated[
    str,
    typer.Option(
        "--fail-on",
        help=f"Finding kinds that fail the run (comma list of {', '.join(KINDS)}).",
        show_default=True,
    ),
]
FailLevelOption = Annotated[FailLevel, typer.Option("--fail-level", help="Lowest severity that fails the run.")]
StepsOption = Annotated[int, typer.Option("--steps", help="Batches to measure: one forward and backward each.")]
TrainStepsOption = Annotated[
    int, typer.Option("--train-steps", help="Plain SGD steps to take before measuring (0: measure at init).")
]
LrOption = Annotated[
    float,
    typer.Option("--lr", help="SGD learning rate for --train-steps; also scales the update-size check."),
]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed for random data, dropout and projections.")]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output on stderr.")]

DEFAULT_FAIL_ON_TEXT = ",".join(DEFAULT_FAIL_ON)


@app.command()
def analyze(
    ctx: typer.Context,
    target: Annotated[
        str,
        typer.Argument(
            help="path/model.py, path/model.py:NAME or package.module:NAME (or `target` in [tool.gradcheck]).",
            show_default=False,
        ),
    ],
    model: Annotated[str | None, typer.Option("--model", "-m", help="NAME of the model in TARGET.")] = None,
    weights: Annotated[
        str | None, typer.Option("--weights", "-w", help="Load parameters from a .safetensors file.")
    ] = None,
    strict: Annotated[
        bool,
        typer.Option("--strict/--no-strict", help="Require weights to match every key (--no-strict: partial)."),
    ] = True,
    allow_pickle: Annotated[
        bool,
        typer.Option("--allow-pickle", help="Allow .pt/.bin/.ckpt weights (torch.load weights_only=True)."),
    ] = False,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="FILE.safetensors (inputs[, targets]), FILE.py:FN, randn:B,D1,... or randint:HIGH:B,T.",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Batch size for .safetensors data.")] = 32,
    loss: Annotated[str, typer.Option("--loss", help="auto, cross-entropy, mse or FILE.py:FN.")] = "auto",
    steps: StepsOption = 3,
    train_steps: TrainStepsOption = 0,
    lr: LrOption = 0.01,
    seed: SeedOption = 0,
    device: Annotated[
        DeviceChoice, typer.Option("--device", help="auto picks cuda when available.")
    ] = DeviceChoice.auto,
    eval_mode: Annotated[bool, typer.Option("--eval", help="Run in eval mode (default: train mode).")] = False,
    amp: Annotated[
        AmpChoice | None,
        typer.Option("--amp", help="Mixed precision: passes under torch.autocast (fp16 with GradScaler's loss scale)."),
    ] = None,
    parallel: Annotated[
        ParallelChoice | None,
        typer.Option("--parallel", help="Under torchrun: wrap in DistributedDataParallel (ddp) or FSDP2 (fsdp)."),
    ] = None,
    output_format: FormatOption = Format.table,
    output: OutputOption = None,
    fail_on: FailOnOption = DEFAULT_FAIL_ON_TEXT,
    fail_level: FailLevelOption = FailLevel.error,
    signal_warning: Annotated[
        float, typer.Option(help="Signal view: dL/dz change (factor) toward the input that warns.")
    ] = 20.0,
    signal_error: Annotated[float, typer.Option(help="Signal view: factor that is an error.")] = 400.0,
    balance_warning: Annotated[
        float, typer.Option(help="Update view: ||g||/||W|| this many times below the median warns.")
    ] = 10.0,
    balance_error: Annotated[
        float, typer.Option(help="Update view: factor below the median that is an error.")
    ] = 1000.0,
    update_warning: Annotated[
        float, typer.Option(help="Update view: lr*||g||/||W|| (step size relative to weights) that warns.")
    ] = 1.0,
    update_error: Annotated[float, typer.Option(help="Update view: step size that is an error.")] = 10.0,
    dead_warning: Annotated[float, typer.Option(help="Fraction of dead ReLU units that warns.")] = 0.5,
    dead_error: Annotated[float, typer.Option(help="Fraction of dead ReLU units that is an error.")] = 0.9,
    saturation_warning: Annotated[
        float, typer.Option(help="Fraction of saturated sigmoid/tanh inputs that warns.")
    ] = 0.5,
    saturation_error: Annotated[float, typer.Option(help="Fraction of saturated inputs that is an error.")] = 0.9,
    input_lag: Annotated[
        float,
        typer.Option(help="Update view: lag of the input layer (factor) flagged when its input is unstandardised."),
    ] = 2.0,
    min_chain: Annotated[int, typer.Option(help="Fewest layers for a signal-view fit or a balance median.")] = 5,
    plot: PlotOption = None,
    tensorboard: TensorBoardOption = None,
    save_grads: SaveGradsOption = None,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Measure every layer's gradients over a few forward/backward passes and flag the bad ones.

    Defaults come from [tool.gradcheck] in the nearest pyproject.toml, if any; flags given here win.
    """
    with _errors(debug):
        kinds = _parse_fail_on(fail_on)
        thresholds = _thresholds(
            input_lag=input_lag,
            min_chain=min_chain,
            **{k: v for k, v in locals().items() if k.endswith(("_warning", "_error"))},
        )
        outputs = _outputs(output_format, output, plot, tensorboard, save_grads, kinds, fail_level)

        def run(progress: Callable[[str, int, int], None] | None) -> Report:
            from gradcheck_cli.api import analyze_target

            _freeze_imported_objects()
            return analyze_target(
                target,
                model_name=model,
                weights=weights,
                strict=strict,
                allow_pickle=allow_pickle,
                data=data,
                loss=loss,
                steps=steps,
                batch_size=batch_size,
                train_steps=train_steps,
                lr=lr,
                seed=seed,
                device=device.value,
                eval_mode=eval_mode,
                thresholds=thresholds,
                amp=amp.value if amp else None,
                parallel=parallel.value if parallel else None,
                value_histograms=outputs.value_histograms,
                save_grads=save_grads,
                progress=progress,
            )

        report = _with_progress(run, quiet or output_format != Format.table)
        config_path = ctx.meta.get("gradcheck.config")
        if config_path is not None:
            report.notes.insert(0, f"config: {config_path}")
        raise typer.Exit(outputs.emit(report))


@app.command()
def demo(
    name: Annotated[str | None, typer.Argument(help="Which demo (see --list).", show_default=False)] = None,
    list_demos: Annotated[bool, typer.Option("--list", help="List the demos, one per line.")] = False,
    data: Annotated[
        Path | None,
        typer.Option("--data", "-d", help="Real MNIST: torchvision's MNIST/raw folder or a .safetensors file."),
    ] = None,
    steps: StepsOption = 3,
    train_steps: TrainStepsOption = 0,
    lr: LrOption = 0.01,
    seed: SeedOption = 0,
    output_format: FormatOption = Format.table,
    output: OutputOption = None,
    fail_on: FailOnOption = DEFAULT_FAIL_ON_TEXT,
    fail_level: FailLevelOption = FailLevel.error,
    plot: PlotOption = None,
    tensorboard: TensorBoardOption = None,
    save_grads: SaveGradsOption = None,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Replay the 2017 tutorial's sigmoid MLP (sigmoid-mlp) or its fixed twin (relu-he-mlp)."""
    from gradcheck_cli.demo_names import DEMO_SUMMARIES

    if list_demos:
        for demo_name, summary in DEMO_SUMMARIES.items():
            typer.echo(f"{demo_name}  {summary}")
        return
    with _errors(debug):
        if name is None:
            raise UserError("no demo named", f"choose one of: {', '.join(DEMO_SUMMARIES)} (gradcheck demo --list)")
        if name not in DEMO_SUMMARIES:
            raise UserError(f"unknown demo '{name}'", f"choose one of: {', '.join(DEMO_SUMMARIES)}")
        kinds = _parse_fail_on(fail_on)
        outputs = _outputs(output_format, output, plot, tensorboard, save_grads, kinds, fail_level)

        def run(progress: Callable[[str, int, int], None] | None) -> Report:
            import torch

            from gradcheck_cli.api import analyze
            from gradcheck_cli.demos import TUTORIAL_BATCH, get_demo, mnist_batches, synthetic_digits

            _freeze_imported_objects()
            chosen = get_demo(name)
            torch.manual_seed(seed)  # the demo's N(0, 1) weights are part of what is reproduced
            count = steps + train_steps
            if data is not None:
                batches, source = mnist_batches(data, count), f"MNIST from {data}"
            else:
                batches, source = synthetic_digits(count, seed), "synthetic MNIST-like digits (no download)"
            return analyze(
                chosen.build(),
                batches,
                "cross-entropy",
                steps=steps,
                train_steps=train_steps,
                lr=lr,
                seed=seed,
                device="cpu",
                batch_size=TUTORIAL_BATCH,
                value_histograms=outputs.value_histograms,
                save_grads=save_grads,
                progress=progress,
                target=f"demo {name}",
                notes=[f"data: {source}"],
            )

        report = _with_progress(run, quiet or output_format != Format.table)
        raise typer.Exit(outputs.emit(report))


@app.command()
def compare(
    base: Annotated[
        Path, typer.Argument(help="The reference report (JSON from gradcheck analyze).", show_default=False)
    ],
    new: Annotated[Path, typer.Argument(help="The report to check against it.", show_default=False)],
    factor: Annotated[
        float,
        typer.Option(
            "--factor",
            help="A layer regressed when a norm's ratio new/base leaves [1/F, F] (10: an order of magnitude).",
        ),
    ] = 10.0,
    output_format: Annotated[
        CompareFormat, typer.Option("--format", "-f", help="table (for people), json or markdown.")
    ] = CompareFormat.table,
    debug: DebugOption = False,
) -> None:
    """Per-layer changes between two reports; exit 1 when a layer regressed (a CI regression gate)."""
    with _errors(debug):
        from gradcheck_cli.compare import compare as compare_reports
        from gradcheck_cli.compare import load
        from gradcheck_cli.render import compare as render
        from gradcheck_cli.render import github

        comparison = compare_reports(load(base), load(new), factor, (str(base), str(new)))
        if output_format == CompareFormat.json:
            sys.stdout.write(comparison.to_json() + "\n")
        elif output_format == CompareFormat.markdown:
            sys.stdout.write(render.render_markdown(comparison))
        else:
            from gradcheck_cli.outputs import stdout_console

            render.render_table(comparison, stdout_console())
        if github.enabled():
            for line in render.workflow_commands(comparison):
                print(line, file=sys.stderr)
        raise typer.Exit(EXIT_FINDINGS if comparison.regressions else EXIT_OK)


# -- helpers ----------------------------------------------------------------------------------------------


def _parse_fail_on(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UserError(f"unknown --fail-on kind(s): {', '.join(unknown)}", f"choose from {', '.join(KINDS)}")
    return kinds


def _thresholds(**values: float | int) -> Thresholds:
    from gradcheck_cli.diagnose import Thresholds

    thresholds = Thresholds(**values)  # type: ignore[arg-type]  # every option here is a float field
    thresholds.validate()
    return thresholds


def _outputs(
    output_format: Format,
    output: Path | None,
    plot: Path | None,
    tensorboard: Path | None,
    save_grads: Path | None,
    fail_on: list[str],
    fail_level: FailLevel,
) -> Outputs:
    """Where the report goes, checked before any pass runs (suffixes, folders, optional extras)."""
    from gradcheck_cli.outputs import Outputs

    outputs = Outputs(output_format.value, output, plot, tensorboard, save_grads, tuple(fail_on), fail_level.value)
    outputs.check()
    return outputs


def _freeze_imported_objects() -> None:
    """Once torch and gradcheck's modules are in, move every object alive now (~10^6 of them, alive until
    exit) out of the garbage collector's reach (gc.freeze), then switch the collector back on (main() turned
    it off): the user's code runs with it on, and no full collection walks the imports again (70-90 ms each
    on a CI machine). Only in the CLI process: the Python API leaves the caller's collector alone."""
    import gc

    gc.freeze()
    gc.enable()


def _with_progress(run: Callable[[Any], Report], quiet: bool) -> Report:
    """Run with a progress bar on stderr when stderr is a terminal (never on stdout)."""
    from gradcheck_cli.distributed import main_process

    if quiet or not sys.stderr.isatty() or not main_process():
        return _quietly(run, None)  # and without importing rich: JSON runs in CI start faster
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        console=console,
        transient=True,
    ) as bar:
        tasks: dict[str, Any] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                label = "SGD steps" if phase == "train" else "forward/backward passes"
                tasks[phase] = bar.add_task(label, total=total)
            bar.update(tasks[phase], completed=done)

        return _quietly(run, progress)


def _quietly(run: Callable[[Any], Report], progress: Any) -> Report:
    """Keep library warnings (torch's NumPy notice, hook internals) off the user's terminal; the model's own
    warnings are summarised as report notes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run(progress)
    seen = []
    for warning in caught:
        text = str(warning.message).splitlines()[0] if str(warning.message) else warning.category.__name__
        if "NumPy" in text or text in seen:
            continue
        seen.append(text)
    for text in seen[:3]:
        report.notes.append(f"warning during the run: {text}")
    return report


@contextlib.contextmanager
def _errors(debug: bool) -> Iterator[None]:
    """Map every failure to its exit code and one line on stderr; --debug adds the traceback."""
    try:
        yield
    except typer.Exit:
        raise
    except UserError as error:
        _fail(f"error: {error.one_line()}", EXIT_USAGE, debug)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED, debug)
    except Exception as error:
        if is_out_of_memory(error):
            _fail(
                f"error: out of memory ({type(error).__name__}): use a smaller --batch-size (or batch in --data)",
                EXIT_USAGE,
                debug,
            )
        raise


def _fail(message: str, code: int, debug: bool) -> NoReturn:
    from gradcheck_cli.distributed import main_process

    if main_process():  # under torchrun every rank fails alike: say it once
        if debug:
            import traceback

            traceback.print_exc()
        typer.echo(message, err=True)
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point. The garbage collector is off while modules import (they make next to no
    garbage, and importing torch would trigger two full collections); analyze and demo switch it back on
    once torch is in, after _freeze_imported_objects()."""
    import gc

    gc.disable()
    try:
        app()
    finally:
        gc.enable()
