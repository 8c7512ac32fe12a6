"""`gradcheck compare` for people (Rich table), for job summaries (Markdown) and for GitHub annotations."""

from __future__ import annotations

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from gradcheck_cli.compare import QUANTITIES, Change, Comparison, LayerChange
from gradcheck_cli.render.common import display_name, number
from gradcheck_cli.render.github import command


def ratio_text(change: Change) -> str:
    """'1.2e-03 (x1.05)': the new value and its ratio to the base."""
    if change.ratio is None:
        if change.base is None and change.new is None:
            return "-"
        return f"{number(change.base)} -> {number(change.new)}"
    return f"{number(change.new)} (x{change.ratio:.3g})"


def status_change(layer: LayerChange) -> str:
    if layer.base_status == layer.new_status:
        return layer.new_status
    return f"{layer.base_status} -> {layer.new_status}"


def verdict(comparison: Comparison) -> str:
    regressions = comparison.regressions
    head = "REGRESSED" if regressions else "NO REGRESSION"
    return (
        f"{head}: {len(regressions)} of {len(comparison.layers)} layer(s) regressed "
        f"(factor {comparison.factor:g}: a ratio outside [1/{comparison.factor:g}, {comparison.factor:g}], "
        "or status ok or unjudged -> flagged)"
    )


def build(comparison: Comparison) -> RenderableType:
    header = Text()
    header.append("gradcheck compare", style="bold")
    header.append(f"  base {comparison.base}  ->  new {comparison.new}")
    table = Table(show_edge=False, header_style="bold", pad_edge=False)
    table.add_column("layer", overflow="fold")
    for _, label, _ in QUANTITIES:
        table.add_column(f"{label} new (x new/base)", justify="right")
    table.add_column("status")
    table.add_column("regression", overflow="fold")
    for layer in comparison.layers:
        style = "bold red" if layer.regressed else ""
        table.add_row(
            display_name(layer.name),
            *[Text(ratio_text(change), style="red" if change.regressed else "") for change in layer.changes],
            Text(status_change(layer), style="red" if layer.base_status != layer.new_status else ""),
            Text("; ".join(layer.reasons) or "-", style=style),
        )
    parts: list[RenderableType] = [header, Text(""), table, Text("")]
    if comparison.added:
        parts.append(Text(f"new layers (not compared): {', '.join(map(display_name, comparison.added))}", style="dim"))
    if comparison.removed:
        parts.append(Text(f"removed layers: {', '.join(map(display_name, comparison.removed))}", style="dim"))
    for note in comparison.notes:
        parts.append(Text(f"note: {note}", style="dim"))
    parts.append(Text(verdict(comparison), style="bold red" if comparison.regressions else "bold green"))
    return Group(*parts)


def render_table(comparison: Comparison, console: Console) -> None:
    console.print(build(comparison))


def render_markdown(comparison: Comparison) -> str:
    lines = [
        "## gradcheck compare",
        "",
        f"**{verdict(comparison)}**",
        "",
        f"base `{comparison.base}` -> new `{comparison.new}`",
        "",
        "| layer | "
        + " | ".join(f"{label} new (×new/base)" for _, label, _ in QUANTITIES)
        + " | status | regression |",
        "|---|" + "---:|" * len(QUANTITIES) + "---|---|",
    ]
    for layer in comparison.layers:
        cells = [f"`{display_name(layer.name)}`"]
        cells += [f"**{ratio_text(c)}**" if c.regressed else ratio_text(c) for c in layer.changes]
        cells += [status_change(layer), ("❌ " + "; ".join(layer.reasons)) if layer.regressed else ""]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines.append("")
    if comparison.added:
        lines.append(f"- new layers (not compared): {', '.join(f'`{display_name(n)}`' for n in comparison.added)}")
    if comparison.removed:
        lines.append(f"- removed layers: {', '.join(f'`{display_name(n)}`' for n in comparison.removed)}")
    lines += [f"- note: {note}" for note in comparison.notes]
    return "\n".join(lines) + "\n"


def workflow_commands(comparison: Comparison) -> list[str]:
    return [
        command("error", "gradcheck regression", f"{display_name(layer.name)}: {'; '.join(layer.reasons)}")
        for layer in comparison.regressions
    ]
