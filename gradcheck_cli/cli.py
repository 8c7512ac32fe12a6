"""The `gradcheck` command: a thin Typer skin over the Python API.

Parses options, calls the API, renders, and maps outcomes to exit codes in one place:
0 no failing finding, 1 a failing finding, 2 bad usage or input, 130 interrupted, 143 terminated.
torch is imported only inside commands, so `gradcheck --help` and `--version` start fast.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import sys
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from gradcheck_cli._version import __version__
from gradcheck_cli.errors import Terminated, UserError, exited, is_out_of_memory, raise_on_sigterm
from gradcheck_cli.gate import EXIT_FINDINGS, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, EXIT_USAGE
from gradcheck_cli.options import Flag, Options, flags
from gradcheck_cli.progress import with_progress

if TYPE_CHECKING:
    from gradcheck_cli.report import Report

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


class CompareFormat(str, enum.Enum):
    table = "table"
    json = "json"
    markdown = "markdown"


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
    from gradcheck_cli.resolve import config

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
            if isinstance(value, bool) and not getattr(by_name[param_name], "is_flag", False):
                raise ValueError("true/false where a value is expected (TOML booleans are not numbers)")
            by_name[param_name].process_value(probe, value)
        except Exception as error:
            key = next(k for k, v in config.option_names(params).items() if v == param_name)
            message = getattr(error, "message", None) or str(error)
            shown = str(value).lower() if isinstance(value, bool) else repr(value)  # as TOML writes it
            raise UserError(
                f"{found.path}: [tool.gradcheck] {key} = {shown}: {message}",
                f"give what --{key} takes (gradcheck {name} --help)",
            ) from None
    ctx.default_map = {**(ctx.default_map or {}), name: values}
    ctx.meta["gradcheck.config"] = found.path


# -- options: made from the fields of options.Options, so the CLI, [tool.gradcheck] and the API agree --------

DEBUG_HELP = "Show tracebacks for errors."
DebugOption = Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)]


def _parameter(name: str, default: Any, flag: Flag, annotation: Any) -> inspect.Parameter:
    """One command-line option as Typer reads it from a signature."""
    decls = [f"{flag.names[0]}/{flag.negative}"] if flag.negative else list(flag.names)
    if flag.choices:  # Typer shows and checks choices of an Enum
        choices: Any = enum.Enum(name, {choice: choice for choice in flag.choices}, type=str)  # type: ignore[misc]
        default = None if default is None else choices(default)
        annotation = choices | None if default is None else choices
    elif isinstance(default, tuple):  # a comma list (--fail-on)
        annotation, default = str, ",".join(default)
    option = typer.Option(default, *decls, help=flag.help, show_default=default is not None)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def _option_parameters(names: set[str] | None = None) -> list[inspect.Parameter]:
    from gradcheck_cli.diagnose.thresholds import Thresholds

    hints = {**typing.get_type_hints(Options), **typing.get_type_hints(Thresholds)}
    return [
        _parameter(name, default, flag, hints[name])
        for name, default, flag in flags()
        if names is None or name in names
    ]


def _command(
    function: Callable[..., Any],
    before: list[inspect.Parameter],
    after: list[inspect.Parameter],
    names: set[str] | None = None,
) -> Callable[..., Any]:
    """`function(**values)` with the signature Typer builds the command from: `before`, the options (those
    in `names`; all by default), `after`."""
    parameters = [*before, *_option_parameters(names), *after]
    function.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    function.__annotations__ = {p.name: p.annotation for p in parameters}
    return function


def _values(values: dict[str, Any]) -> dict[str, Any]:
    """Choices back from their Enum to the plain string Options holds."""
    return {k: v.value if isinstance(v, enum.Enum) else v for k, v in values.items()}


def _analyze(ctx: typer.Context, target: str, debug: bool, **values: Any) -> None:
    """Measure every layer's gradients over a few forward/backward passes and flag the bad ones.

    Defaults come from \\[tool.gradcheck] in the nearest pyproject.toml, if any; flags given here win.
    """
    with _errors(debug):
        options = Options.from_flags({**_values(values), "base": Path.cwd()})  # before any user code runs
        outputs = _outputs(options)
        from gradcheck_cli.resolve.specs import input_files

        reads = input_files(target, options.weights, options.data, options.loss, options.optimizer)
        _refuse_inputs(options, {**reads, "config file": ctx.meta.get("gradcheck.config")})

        def run(progress: Callable[[str, int, int], None] | None) -> Report:
            from gradcheck_cli.api import analyze_target

            _tune_process()
            with contextlib.redirect_stdout(sys.stderr):  # the user's prints must not mix with the document
                return analyze_target(target, options, progress)

        report = with_progress(run, options.quiet or options.format != "table")
        config_path = ctx.meta.get("gradcheck.config")
        if config_path is not None:
            report.notes.insert(0, f"config: {config_path}")
        raise typer.Exit(outputs.emit(report))


_CONTEXT = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
_DEBUG = inspect.Parameter(
    "debug",
    inspect.Parameter.KEYWORD_ONLY,
    default=typer.Option(False, "--debug", help=DEBUG_HELP),
    annotation=bool,
)
_TARGET = inspect.Parameter(
    "target",
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    default=typer.Argument(
        ...,
        help="path/model.py, path/model.py:NAME or package.module:NAME (or `target` in \\[tool.gradcheck]).",
        show_default=False,
    ),
    annotation=str,
)
app.command(name="analyze")(_command(_analyze, [_CONTEXT, _TARGET], [_DEBUG]))

DEMO_OPTIONS = {
    "steps",
    "train_steps",
    "optimizer",
    "weight_decay",
    "clip",
    "lr",
    "seed",
    "format",
    "output",
    "fail_on",
    "fail_level",
    "plot",
    "tensorboard",
    "save_grads",
    "quiet",
}


def _demo(name: str | None, list_demos: bool, mnist: Path | None, debug: bool, **values: Any) -> None:
    """Replay the 2017 tutorial's sigmoid MLP (sigmoid-mlp) and its fixed twin (relu-he-mlp), watch the twin's
    units die under too large SGD steps (dying-relu), or see the CI gate fail on nets whose gradients vanish or
    explode by theory (deep-sigmoid, exploding-relu) and pass on their fixed twin (deep-relu-he)."""
    from gradcheck_cli.demo_names import DEMO_SUMMARIES, listing_lines

    if list_demos:
        for line in listing_lines():
            typer.echo(line)
        return
    with _errors(debug):
        if name is None:
            raise UserError("no demo named", f"choose one of: {', '.join(DEMO_SUMMARIES)} (gradcheck demo --list)")
        if name not in DEMO_SUMMARIES:
            raise UserError(f"unknown demo '{name}'", f"choose one of: {', '.join(DEMO_SUMMARIES)}")
        options = Options.from_flags({**_values(values), "device": "cpu", "base": Path.cwd()})
        outputs = _outputs(options)
        _refuse_inputs(options, {"--data file": mnist})

        def run(progress: Callable[[str, int, int], None] | None) -> Report:
            from gradcheck_cli.demos import run_demo

            _tune_process()
            with contextlib.redirect_stdout(sys.stderr):
                return run_demo(name, options, mnist, progress)

        report = with_progress(run, options.quiet or options.format != "table")
        raise typer.Exit(outputs.emit(report))


_DEMO_BEFORE = [
    inspect.Parameter(
        "name",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        default=typer.Argument(None, help="Which demo (see --list).", show_default=False),
        annotation=str | None,
    ),
    inspect.Parameter(
        "list_demos",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(False, "--list", help="List the demos: the exit code to expect and what each shows."),
        annotation=bool,
    ),
    inspect.Parameter(
        "mnist",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(
            None, "--data", "-d", help="Real MNIST: torchvision's MNIST/raw folder or a .safetensors file."
        ),
        annotation=Path | None,
    ),
]
app.command(name="demo")(_command(_demo, _DEMO_BEFORE, [_DEBUG], DEMO_OPTIONS))


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
        from gradcheck_cli.files import to_stdout
        from gradcheck_cli.outputs import stdout_console
        from gradcheck_cli.render import compare as render
        from gradcheck_cli.render import github

        comparison = compare_reports(load(base), load(new), factor, (str(base), str(new)))
        with to_stdout():
            if output_format == CompareFormat.json:
                sys.stdout.write(comparison.to_json() + "\n")
            elif output_format == CompareFormat.markdown:
                sys.stdout.write(render.render_markdown(comparison))
            else:
                render.render_table(comparison, stdout_console())
        if github.enabled():
            for line in render.workflow_commands(comparison):
                print(line, file=sys.stderr)
        raise typer.Exit(EXIT_FINDINGS if comparison.regressions else EXIT_OK)


# -- helpers ----------------------------------------------------------------------------------------------


def _refuse_inputs(options: Options, inputs: dict[str, Path | None]) -> None:
    from gradcheck_cli.files import refuse_inputs

    outputs = {"--output": options.output, "--plot": options.plot, "--save-grads": options.save_grads}
    if options.save_bad_batch is not None:
        from gradcheck_cli.files import bad_batch_weights

        outputs["--save-bad-batch"] = options.save_bad_batch
        outputs["--save-bad-batch (its weights file)"] = bad_batch_weights(options.save_bad_batch)
    refuse_inputs(outputs, inputs)


def _outputs(options: Options) -> Any:
    """Where the report goes, checked before any pass runs (suffixes, folders, optional extras)."""
    from gradcheck_cli.outputs import Outputs

    outputs = Outputs(options)
    outputs.check()
    return outputs


def _tune_process() -> None:
    """Once torch and gradcheck's modules are in, move every object alive now (~10^6 of them, alive until
    exit) out of the garbage collector's reach (gc.freeze), then switch the collector back on (main() turned
    it off): the user's code runs with it on, and no full collection walks the imports again (70-90 ms each
    on a CI machine). And keep the memory steps free in the process (heap.py says why). Only in the CLI
    process: the Python API leaves the caller's collector and allocator alone."""
    import gc

    from gradcheck_cli.heap import steady_heap

    gc.freeze()
    gc.enable()
    steady_heap()


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
    except Terminated:
        _fail("terminated (SIGTERM); temporary files removed", EXIT_TERMINATED, debug)
    except SystemExit as error:  # gradcheck itself never exits inside a command: this is the user's code
        _fail(f"error: {exited(error, 'the model code').one_line()}", EXIT_USAGE, debug)
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
    once torch is in, after _tune_process()."""
    import gc

    gc.disable()
    raise_on_sigterm()
    try:
        app()
    except SystemExit as exc:
        distributed = sys.modules.get("gradcheck_cli.distributed")  # only a run that used it (torch-free here)
        if distributed is not None:
            distributed.exit_after_group(exc.code)
        raise
    finally:
        gc.enable()
