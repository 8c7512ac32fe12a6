"""The table read as people read it: real-shaped reports (a DenseNet-121-like CNN, a 12-block BERT-like
encoder, a 4-layer MLP) at 80, 100 and 160 columns, piped, and in a pseudo-terminal."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

import gradcheck_cli
from gradcheck_cli.gate import Gate
from gradcheck_cli.render import table
from gradcheck_cli.report import Report


class DenseLayer(nn.Module):
    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, 2 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(2 * growth), nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(torch.relu(self.norm2(self.conv1(torch.relu(self.norm1(x))))))
        return torch.cat([x, out], 1)


class DenseNetLike(nn.Module):
    """DenseNet-121's layout (Huang et al. 2017): dense blocks of 6, 12, 24 and 16 layers, 120 convolutions and
    a classifier, narrow (growth 4) so that it runs in a second."""

    def __init__(self, growth: int = 4) -> None:
        super().__init__()
        channels = 8
        layers: dict[str, nn.Module] = {
            "conv0": nn.Conv2d(3, channels, 3, padding=1),
            "norm0": nn.BatchNorm2d(channels),
        }
        for block, count in enumerate((6, 12, 24, 16), start=1):
            dense = nn.Sequential()
            for index in range(1, count + 1):
                dense.add_module(f"denselayer{index}", DenseLayer(channels, growth))
                channels += growth
            layers[f"denseblock{block}"] = dense
            if block < 4:
                layers[f"transition{block}"] = nn.Sequential(
                    nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels // 2, 1), nn.AvgPool2d(2)
                )
                channels //= 2
        self.features = nn.ModuleDict(layers)
        self.classifier = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.features.values():
            x = module(x)
        return self.classifier(torch.relu(x).mean((2, 3)))


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attention = nn.ModuleDict({name: nn.Linear(width, width) for name in ("query", "key", "value", "output")})
        self.attention_norm, self.output_norm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.intermediate, self.output = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention
        scores = a["query"](x) @ a["key"](x).transpose(-1, -2) / x.shape[-1] ** 0.5
        x = self.attention_norm(x + a["output"](torch.softmax(scores, -1) @ a["value"](x)))
        return self.output_norm(x + self.output(nn.functional.gelu(self.intermediate(x))))


class BertLike(nn.Module):
    """BERT-base's layer names and order: embeddings, 12 post-LN blocks, a head over the vocabulary."""

    def __init__(self, vocab: int = 200, width: int = 32, blocks: int = 12) -> None:
        super().__init__()
        self.bert = nn.Module()
        self.bert.embeddings = nn.Embedding(vocab, width)
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = nn.ModuleList(Block(width) for _ in range(blocks))
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.bert.embeddings(ids)
        for block in self.bert.encoder.layer:
            x = block(x)
        return self.head(x)


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


@cache
def _report(name: str) -> Report:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if name == "densenet":
        batches = [(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g))] * 2
        return gradcheck_cli.analyze(DenseNetLike(), batches, steps=2)
    if name == "bert":
        ids = torch.randint(0, 200, (4, 13), generator=g)
        return gradcheck_cli.analyze(BertLike(), (ids[:, :-1], ids[:, 1:]), steps=2)
    if name == "bert-broken":  # block 5's MLP dead: GELU(x - 50) and its derivative are exactly 0 in float32
        model = BertLike()
        with torch.no_grad():
            model.bert.encoder.layer[5].intermediate.bias.fill_(-50.0)
        ids = torch.randint(0, 200, (4, 13), generator=g)
        return gradcheck_cli.analyze(model, (ids[:, :-1], ids[:, 1:]), steps=2)
    return gradcheck_cli.analyze(_mlp(), (torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)))


def _render(report: Report, width: int | None, layers: str = "folded") -> str:
    """What a terminal of `width` columns shows (None: piped, at the CI-log width)."""
    buffer = io.StringIO()
    console = Console(
        file=buffer, width=width or table.PIPED_WIDTH, color_system=None, force_terminal=width is not None
    )
    table.render(report, Gate.of(report), console, layers)
    return buffer.getvalue()


def _table_rows(text: str) -> list[str]:
    """The body lines of the table: between the header rule (╇) and the first blank line after it."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "╇" in line) + 1
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())
    return lines[start:end]


CUT_NUMBER = re.compile(r"[\d.e+\-]…|…[\d]")  # an ellipsis next to part of a number


@pytest.mark.parametrize("width", [80, 100, 160, None], ids=["80", "100", "160", "piped"])
@pytest.mark.parametrize("name", ["densenet", "bert", "mlp"])
def test_numbers_are_never_cut_and_names_never_wrap(name: str, width: int | None) -> None:
    text = _render(_report(name), width)
    body = _table_rows(text)
    for line in text.splitlines():
        assert len(line) <= (width or table.PIPED_WIDTH), line
    for line in body:
        cells = line.split("│")
        assert not any(CUT_NUMBER.search(cell) for cell in cells[1:]), line  # a name may be shortened, not a number
        assert cells[0].strip(), f"a continuation line, so a name wrapped: {line!r}"
    # every row has its numbers: the three value columns that a narrow terminal keeps
    header = next(line for line in text.splitlines() if "┃" in line)
    assert all(column in header for column in ("layer", "‖g‖", "‖g‖/‖W‖", "‖dL/dz‖", "status")), header


def test_a_densenet_like_report_fits_60_lines_and_a_bert_like_one_40() -> None:
    densenet, bert = _render(_report("densenet"), 100), _render(_report("bert"), 100)
    assert len(_report("densenet").layers) > 240 and len(_report("bert").layers) == 98
    assert len(densenet.splitlines()) <= 60, densenet
    assert len(bert.splitlines()) <= 40, bert


def test_a_small_mlp_keeps_one_row_per_layer() -> None:
    """Folding is for repeated blocks; a 4-layer chain's per-depth numbers are the point."""
    assert len(_table_rows(_render(_report("mlp"), 100))) == 4


def test_a_flagged_layer_always_has_its_own_row() -> None:
    report = _report("bert-broken")
    flagged = {layer.name for layer in report.layers if layer.severity is not None}
    assert "bert.encoder.layer.5.intermediate" in flagged
    for width in (80, 160):
        names = [line.split("│")[0].strip() for line in _table_rows(_render(report, width))]
        alone = [name for name in names if name.endswith("5.intermediate") and "}" not in name]
        assert len(alone) == 1 and (width == 80 or alone[0] == "bert.encoder.layer.5.intermediate"), names
        folded = [name for name in names if name.endswith("}.intermediate")]
        assert len(folded) == 1 and (width == 80 or "{0..4,6..11}" in folded[0]), names


def test_a_long_sequential_folds_its_every_other_index_as_one_run_with_its_step() -> None:
    """nn.Sequential(Linear, ReLU, Linear, ReLU, ...) holds its weight layers at every other index (0, 2, 4, ...).
    Listed one by one, 28 of them made the folded row's name wider than its numbers, so a 150-column terminal
    dropped the type, params, spread and histogram columns; written as one run with its step they stay."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(40):  # past FOLD_ANY_ABOVE layers, where positions in a chain fold too
        linear = nn.Linear(32, 32)
        nn.init.kaiming_normal_(linear.weight)
        layers += [linear, nn.ReLU()]
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(64, 32, generator=g), torch.randint(0, 32, (64,), generator=g))
    report = gradcheck_cli.analyze(nn.Sequential(*layers), batch, steps=2)
    text = _render(report, 150)
    names = [line.split("│")[0].strip() for line in _table_rows(text)]
    shown = {index for name in names if name.isdigit() for index in [int(name)]}
    folded = [name for name in names if "by 2" in name]
    assert len(folded) == 1 and re.fullmatch(r"\{\d+\.\.78 by 2\}", folded[0]), names
    first = int(folded[0][1:].split("..")[0])
    # every weight layer is in a row: its own, or the run's
    assert shown | set(range(first, 79, 2)) == set(range(0, 79, 2)), names
    header = next(line for line in text.splitlines() if "┃" in line)
    assert all(column in header for column in ("type", "params", "spread")), header


def test_layers_all_shows_every_layer_and_flagged_only_the_flagged() -> None:
    report = _report("bert-broken")
    assert len(_table_rows(_render(report, 160, "all"))) == len(report.layers)
    flagged = [layer for layer in report.layers if layer.severity is not None]
    text = _render(report, 160, "flagged")
    assert len(_table_rows(text)) == len(flagged)
    assert f"{len(report.layers) - len(flagged)} layer(s) without findings not shown (--layers all" in text


def test_columns_left_out_are_named() -> None:
    text = _render(_report("bert"), 80)
    assert "left out to fit 80 columns:" in text and "|g| histogram" in text
    assert "left out" not in _render(_report("bert"), 160)


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_in_a_real_80_column_terminal(tmp_path: Path) -> None:
    """The CLI in a pseudo-terminal of 80 columns, as a tmux pane shows it: the terminal's own width is used."""
    import fcntl
    import pty
    import struct
    import termios

    (tmp_path / "bert.py").write_text(
        "import torch\nfrom test_table import BertLike\nmodel = BertLike()\n"
        "def get_batch():\n    ids = torch.randint(0, 200, (4, 13), generator=torch.Generator().manual_seed(0))\n"
        "    return ids[:, :-1], ids[:, 1:]\n"
    )
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 80, 0, 0))
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
    env |= {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")]), "TERM": "xterm"}
    process = subprocess.Popen(
        [sys.executable, "-m", "gradcheck_cli", "analyze", "bert.py", "--quiet"],
        cwd=tmp_path, stdin=follower, stdout=follower, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=120)
    os.close(leader)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode("utf-8", "replace")).replace("\r", "")
    assert process.returncode == 0, text
    assert all(len(line) <= 80 for line in text.splitlines()), text
    body = _table_rows(text)
    assert len(body) <= 12 and not any(CUT_NUMBER.search(line) for line in body), text


BLOCKS = """
import torch
from torch import nn

class Net(nn.Module):
    # four blocks of two orthogonal linear maps: gain exactly 1 everywhere, so nothing is flagged and all fold
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(a=nn.Linear(8, 8), b=nn.Linear(8, 8))) for _ in range(4))
        for block in self.blocks:
            for layer in block.values():
                nn.init.orthogonal_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x):
        for block in self.blocks:
            x = block["b"](block["a"](x))
        return x

model = Net()
"""


def test_layers_is_a_flag_and_a_config_key(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocks.py").write_text(BLOCKS)
    folded = cli("analyze", "blocks.py", "--data", "randn:16,8")
    assert folded.exit_code == 0 and "blocks.{0..3}.a " in folded.stdout and "blocks.{0..3}.b " in folded.stdout
    every = cli("analyze", "blocks.py", "--data", "randn:16,8", "--layers", "all")
    assert all(f"blocks.{i}.a " in every.stdout for i in range(4))
    (tmp_path / "pyproject.toml").write_text('[tool.gradcheck]\nlayers = "all"\n')
    assert "blocks.3.b " in cli("analyze", "blocks.py", "--data", "randn:16,8").stdout
    bad = cli("analyze", "blocks.py", "--data", "randn:16,8", "--layers", "some")
    assert bad.exit_code == 2 and "'some' is not one of" in bad.stderr


def test_a_long_status_fits_80_columns_with_its_amount() -> None:
    """A deep sigmoid net (the deep-sigmoid demo's shape): 'vanishing 3e+12x [signal]' is too wide for an
    80-column table of the kept columns. The view tag is shortened ('[sig]') or left to the findings below, so
    that the kind and the amount stay whole on one line."""
    from gradcheck_cli.demos import deep_sigmoid, synthetic_digits

    torch.manual_seed(0)
    report = gradcheck_cli.analyze(deep_sigmoid(), [b.args for b in synthetic_digits(3, 0)])
    first = report.layer(next(layer.name for layer in report.layers if layer.name.endswith("fc1")))
    assert first.status == "vanishing"
    rows = _table_rows(_render(report, 80))
    fc1 = next(line for line in rows if line.startswith("fc1 "))
    assert re.search(r"│ vanishing \de\+\d\dx( \[sig\])?$", fc1.rstrip()), fc1
    assert all(len(line) <= 80 for line in rows)
    assert "[signal]" in _render(report, 160)  # where it fits, the tag is whole
