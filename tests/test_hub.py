"""Model-hub targets: hf:DIR (small configurations saved with save_pretrained), hf:ORG/NAME from a local cache,
timm:NAME, torchvision:NAME, --from-config, --task, --adapter (LoRA), --data FILE.txt; nothing downloaded and
nothing written into the model's directory."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import corpus
import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")

BUILDERS: dict[str, Callable[[], Any]] = {
    "gpt2": corpus.hf_gpt2,
    "bert": corpus.hf_bert(4),
    "llama": corpus.hf_llama(4),
    "t5": corpus.hf_t5,
    "vit": corpus.hf_vit,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each architecture at its library's default initialisation, saved as a user's checkpoint folder is."""
    root = tmp_path_factory.mktemp("hub")
    folders = {}
    for name, build in BUILDERS.items():
        torch.manual_seed(0)
        build().save_pretrained(root / name)
        folders[name] = root / name
    return folders


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_saved_checkpoints_run_clean_with_inputs_from_their_config(cli: Any, saved: dict[str, Path], name: str) -> None:
    folder = saved[name]
    before = listing(folder)
    code, report = cli.json("analyze", f"hf:{folder}", "--quiet")
    assert code == 0, report["findings"]
    assert report["findings"] == [], [f["message"] for f in report["findings"]]
    assert report["target"] == f"hf:{folder}" and report["loss_name"] == "output.loss"
    assert any(note.startswith("no data given:") for note in report["notes"])
    assert listing(folder) == before  # nothing written into the checkpoint's folder


def test_inputs_fit_the_configuration(saved: dict[str, Path]) -> None:
    from gradcheck_cli.hub import HubTarget, build
    from gradcheck_cli.options import Options

    built = build(HubTarget("hf", str(saved["gpt2"])), Options())
    assert built.make_batches is not None
    batch = built.make_batches(1, Options().batch_size, 0)[0]
    ids = batch.kwargs["input_ids"]
    config = built.model.config
    assert ids.shape == (4, min(32, config.n_positions)) and int(ids.max()) < config.vocab_size
    assert torch.equal(batch.kwargs["labels"], ids) and torch.equal(
        batch.kwargs["attention_mask"], torch.ones_like(ids)
    )
    vit = build(HubTarget("hf", str(saved["vit"])), Options())
    assert vit.make_batches is not None
    images = vit.make_batches(1, 32, 0)[0].kwargs
    size = vit.model.config.image_size
    assert images["pixel_values"].shape == (8, vit.model.config.num_channels, size, size)
    assert int(images["labels"].max()) < vit.model.config.num_labels


def test_a_model_id_is_found_in_the_local_cache_only(
    cli: Any, saved: dict[str, Path], tmp_path: Path, monkeypatch: Any
) -> None:
    cache = tmp_path / "cache"
    repo = cache / "models--someone--tiny-gpt2"
    shutil.copytree(saved["gpt2"], repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    before = listing(cache)
    code, report = cli.json("analyze", "hf:someone/tiny-gpt2", "--quiet")
    assert code == 0 and report["model"] == "GPT2LMHeadModel"
    assert listing(cache) == before  # nothing written into the cache either
    missing = cli("analyze", "hf:someone/not-there")
    assert missing.exit_code == 2
    assert "not a local directory nor in the local Hugging Face cache" in missing.stderr
    assert "never downloads" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_from_config_and_task(cli: Any, saved: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(saved["bert"] / "config.json", folder / "config.json")
    without = cli("analyze", f"hf:{folder}")
    assert without.exit_code == 2 and "has no weights" in without.stderr and "--from-config" in without.stderr
    code, report = cli.json("analyze", f"hf:{folder}", "--from-config", "--task", "seq-cls", "--quiet")
    assert code == 0 and report["model"] == "BertForSequenceClassification" and report["findings"] == []


def test_lora_adapter_on_llama_runs_clean_with_a_frozen_base(cli: Any, saved: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(saved["llama"])
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")
    code, report = cli.json("analyze", f"hf:{saved['llama']}", "--adapter", tmp_path / "adapter", "--quiet")
    assert code == 0 and report["findings"] == [], [f["message"] for f in report["findings"]]
    layers = {layer["name"]: layer for layer in report["layers"]}
    a = [layer for name, layer in layers.items() if "lora_A" in name]
    b = [layer for name, layer in layers.items() if "lora_B" in name]
    # B = 0 at init gates A (zero gradient, by design): gated, never dead; B itself learns; the base is frozen
    assert a and all(layer["status"] == "gated" for layer in a)
    assert b and all(layer["status"] == "ok" for layer in b)
    base_layers = [layer for name, layer in layers.items() if "lora" not in name]
    assert base_layers and all(layer["trainable_params"] == 0 for layer in base_layers)


def test_text_data_is_tokenised_by_the_models_tokenizer(cli: Any, saved: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "gpt2-with-tokenizer"
    shutil.copytree(saved["gpt2"], folder)
    words = "the quick brown fox jumps over the lazy dog"
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([words], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text((words + " ") * 100)
    code, report = cli.json("analyze", f"hf:{folder}", "--data", text, "--quiet")
    assert code == 0 and report["batch_size"] == 4
    assert not any(note.startswith("no data given") for note in report["notes"])
    no_tokenizer = cli("analyze", f"hf:{saved['llama']}", "--data", text)
    assert no_tokenizer.exit_code == 2 and "has no tokenizer" in no_tokenizer.stderr
    plain = cli("analyze", "model.py", "--data", text)
    assert plain.exit_code == 2


@pytest.mark.parametrize("target", ["timm:test_resnet", "timm:test_vit", "torchvision:mobilenet_v3_small"])
def test_timm_and_torchvision_names_run(cli: Any, target: str) -> None:
    pytest.importorskip(target.split(":")[0])
    code, report = cli.json("analyze", target, "--quiet", "--steps", "2")
    assert code == 0, [f["message"] for f in report["findings"]]
    assert not [f for f in report["findings"] if f["severity"] == "error"]
    assert any(note.startswith("no data given: standardised images") for note in report["notes"])


@pytest.mark.parametrize(
    ("target", "needle"),
    [
        ("timm:no_such_model", "timm has no model named 'no_such_model'"),
        ("torchvision:fasterrcnn_resnet50_fpn", "is not an image classifier"),
        ("hf:", "names no model after 'hf:'"),
    ],
)
def test_bad_hub_names_are_one_line(cli: Any, target: str, needle: str) -> None:
    result = cli("analyze", target)
    assert result.exit_code == 2 and needle in result.stderr and "Traceback" not in result.stderr


def test_a_missing_extra_is_one_line_with_the_install_command(
    cli: Any, saved: dict[str, Path], monkeypatch: Any
) -> None:
    import gradcheck_cli.hub as hub

    real = hub._installed
    monkeypatch.setattr(hub, "_installed", lambda name: name != "transformers" and real(name))
    result = cli("analyze", f"hf:{saved['gpt2']}")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        'error: this needs transformers, which is not installed: pip install "gradcheck-cli[hf]"'
    ), result.stderr


def test_hub_options_need_a_hub_target(cli: Any, write: Any) -> None:
    model = write("model.py", "import torch\nmodel = torch.nn.Linear(4, 2)\n")
    result = cli("analyze", model, "--from-config")
    assert result.exit_code == 2 and "--from-config applies to hf: targets" in result.stderr


def test_json_of_a_hub_run_round_trips(cli: Any, saved: dict[str, Path]) -> None:
    from gradcheck_cli.report import Report

    code, report = cli.json("analyze", f"hf:{saved['t5']}", "--quiet", "--train-steps", "2", "--optimizer", "adamw")
    assert code == 0
    assert Report.from_dict(json.loads(json.dumps(report))).training is not None


def test_a_timm_model_without_a_classifier_head_gets_one(monkeypatch: Any) -> None:
    """A pretraining layout (pretrained_cfg num_classes 0, EVA-02's MIM checkpoints) returns features: it
    gets a head of 1000 classes, as fine-tuning adds, instead of labels drawn from an empty range."""
    import importlib.util

    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    from gradcheck_cli.hub import import_torchvision
    from gradcheck_cli.hub.vision import HEADLESS_CLASSES, build_timm

    import_torchvision()  # timm imports torchvision: its op schemas first
    import timm

    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: create(name, **{"num_classes": 0, **kw}))
    built = build_timm("test_vit")
    assert built.model.num_classes == HEADLESS_CLASSES
    assert "no classifier head" in built.description
    assert built.make_batches is not None
    batch = next(iter(built.make_batches(1, 2, 0)))
    assert int(batch.targets.max()) < HEADLESS_CLASSES and built.model(*batch.args).shape[-1] == HEADLESS_CLASSES


def test_a_seq2seq_config_without_a_decoder_start_token_gets_shifted_labels(
    cli: Any, saved: dict[str, Path], tmp_path: Path
) -> None:
    """T5's config as transformers 5's AutoConfig makes it has no decoder_start_token_id, which the model needs
    to shift its labels: the decoder inputs are then the labels shifted right from the pad id, as T5 starts."""
    from gradcheck_cli.hub import HubTarget, build
    from gradcheck_cli.options import Options

    folder = tmp_path / "t5"
    shutil.copytree(saved["t5"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("decoder_start_token_id", None)
    (folder / "config.json").write_text(json.dumps(config))
    built = build(HubTarget("hf", str(folder)), Options())
    assert built.make_batches is not None
    batch = built.make_batches(1, Options().batch_size, 0)[0].kwargs
    labels, decoder = batch["labels"], batch["decoder_input_ids"]
    pad = built.model.config.pad_token_id or 0
    assert torch.equal(decoder[:, 0], torch.full_like(decoder[:, 0], pad)) and torch.equal(
        decoder[:, 1:], labels[:, :-1]
    )
    code, report = cli.json("analyze", f"hf:{folder}", "--quiet")
    assert code == 0 and report["findings"] == [], [f["message"] for f in report["findings"]]


@pytest.mark.parametrize(
    ("name", "base", "reads"), [("bert", "BertModel", "input_ids"), ("vit", "ViTModel", "pixel_values")]
)
def test_a_base_model_without_a_head_gets_unlabelled_inputs_and_a_projected_loss(
    cli: Any, saved: dict[str, Path], tmp_path: Path, name: str, base: str, reads: str
) -> None:
    """A config naming a base model (no task head) still runs: its inputs from the config, no labels, and the
    loss a fixed random projection of its output (README: Loss); the head-less model's layers all learn."""
    from gradcheck_cli.hub import HubTarget, build
    from gradcheck_cli.options import Options

    folder = tmp_path / name
    folder.mkdir()
    config = json.loads((saved[name] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, architectures=[base])))
    built = build(HubTarget("hf", str(folder)), Options(from_config=True))
    assert type(built.model).__name__ == base and built.make_batches is not None
    batch = built.make_batches(1, Options().batch_size, 0)[0].kwargs
    assert reads in batch and "labels" not in batch
    if reads == "pixel_values":
        assert batch[reads].shape[1:] == (config["num_channels"], config["image_size"], config["image_size"])
    code, report = cli.json("analyze", f"hf:{folder}", "--from-config", "--quiet")
    assert code == 0, [f["message"] for f in report["findings"]]
    assert report["loss_name"] == "random-projection"
    # every trainable layer got a gradient but the pooler, which feeds only pooler_output (a side output)
    silent = [layer["name"] for layer in report["layers"] if layer["trainable_params"] and not layer["grad_norm"]]
    assert silent in ([], ["pooler.dense"]), silent
    assert len(report["layers"]) > 20


def test_a_hybrid_with_only_linear_attention_runs_without_a_key_value_cache(cli: Any, tmp_path: Path) -> None:
    """Bamba at 2 layers holds only Mamba (linear-attention) layers, and building its default cache raises in
    the forward ('get_seq_length can only be called on Attention layers'). A training pass keeps no cache:
    gradcheck turns it off in the loaded model's config (the folder is not changed), and the run is clean."""
    pytest.importorskip("transformers")
    from transformers import BambaConfig

    folder = tmp_path / "bamba"
    BambaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        mamba_d_state=8,
        mamba_n_heads=4,
        mamba_d_head=16,
    ).save_pretrained(folder)
    saved = (folder / "config.json").read_text()
    code, report = cli.json("analyze", f"hf:{folder}", "--from-config", "--task", "causal-lm", "--quiet")
    assert code == 0 and not [f for f in report["findings"] if f["severity"] == "error"], report["findings"]
    assert (folder / "config.json").read_text() == saved
