"""hf:ID_OR_DIR: a Hugging Face transformers model from a local directory or the local cache, never the
network, with inputs made from its own configuration (token ids within the vocabulary and the position limit,
attention masks, labels for its task; images of its configured size and channels).

The task head comes from the config's `architectures`, or --task. --from-config builds the architecture at
random initialisation instead of loading weights; --adapter DIR loads a PEFT adapter (LoRA...) onto the model,
which freezes the base and trains the adapter, as a fine-tuning run starts. Nothing is written into the model
directory or the cache: the directory is only read, and the hub libraries run offline.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import UserError, calling
from gradcheck_cli.hub import Built, library

if TYPE_CHECKING:
    from gradcheck_cli.options import Options

AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "masked-lm": "AutoModelForMaskedLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "image-cls": "AutoModelForImageClassification",
}
# What a model class's name says about its task, in the order checked.
CLASS_TASKS = (
    ("ImageClassification", "image-cls"),
    ("SequenceClassification", "seq-cls"),
    ("ConditionalGeneration", "seq2seq"),
    ("Seq2SeqLM", "seq2seq"),
    ("MaskedLM", "masked-lm"),
    ("CausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
)
SEQUENCE_LENGTH = 32  # tokens per synthetic sequence, or the model's position limit when it is lower
TEXT_BATCH = 4  # synthetic sequences per batch unless --batch-size says otherwise
IMAGE_BATCH = 8
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def offline() -> None:
    """No network, whatever the environment says: the hub libraries read these when they are imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def locate(name: str) -> Path:
    """The directory hf:NAME names: a local directory with config.json, or a snapshot in the local cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json", "give the directory save_pretrained() wrote")
        return path
    if path.exists():
        raise UserError(f"hf:{name} is a file, not a model directory", "give the directory that holds config.json")
    parts = name.split("/")
    if len(parts) > 2 or not all(parts) or name.startswith((".", "~")):
        raise UserError(f"hf:{name}: no such directory", "give a directory with config.json, or a model id org/name")
    cache = _cache_root()
    folder = cache / f"models--{name.replace('/', '--')}"
    snapshot = _snapshot(folder)
    if snapshot is None:
        raise UserError(
            f"hf:{name} is not a local directory nor in the local Hugging Face cache ({cache}); gradcheck never "
            "downloads",
            f"download it first (huggingface-cli download {name}), or save it with save_pretrained(DIR) and use hf:DIR",
        )
    return snapshot


def _cache_root() -> Path:
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _snapshot(folder: Path) -> Path | None:
    """refs/main's snapshot, else the newest snapshot with a config.json."""
    ref = folder / "refs" / "main"
    if ref.is_file():
        candidate = folder / "snapshots" / ref.read_text().strip()
        if (candidate / "config.json").is_file():
            return candidate
    snapshots = folder / "snapshots"
    found = [s for s in snapshots.iterdir() if (s / "config.json").is_file()] if snapshots.is_dir() else []
    return max(found, key=lambda s: s.stat().st_mtime) if found else None


def build_hf(name: str, options: Options) -> Built:
    offline()
    directory = locate(name)
    transformers = library("transformers")
    with contextlib.suppress(AttributeError):  # "Loading weights" bars on stderr are not the report's
        transformers.utils.logging.disable_progress_bar()
    config = calling(
        "reading config.json", lambda: transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    )
    cls, task = _model_class(transformers, config, options.task, directory)
    notes = [f"hf: {directory} ({cls.__name__}, task {task})"]
    if options.from_config:
        model = calling(f"{cls.__name__} from config.json", lambda: _from_config(cls, config))
        notes.append("--from-config: the architecture at random initialisation (no weights loaded)")
    else:
        safetensors = [f for f in WEIGHT_FILES if (directory / f).is_file()]
        pickled = [f for f in PICKLE_FILES if (directory / f).is_file()]
        if not safetensors and not pickled:
            raise UserError(
                f"{directory} has no weights ({' or '.join(WEIGHT_FILES)})",
                "add --from-config to check the architecture at random initialisation",
            )
        if not safetensors and not options.allow_pickle:
            raise UserError(
                f"{directory} has only pickled weights ({pickled[0]})",
                "add --allow-pickle, or convert them to safetensors",
            )
        model = calling(
            f"{cls.__name__}.from_pretrained({directory})",
            lambda: cls.from_pretrained(directory, local_files_only=True, use_safetensors=bool(safetensors)),
        )
    if options.adapter is not None:
        model = _with_adapter(model, Path(options.adapter))
        notes.append(f"adapter: {options.adapter} (base frozen, adapter trainable)")
    inner: Any = getattr(model, "config", None)
    if getattr(inner, "use_cache", None):
        # a training pass keeps no key/value cache (the passes measured are training steps), and building one
        # fails in some hybrids at small depths (Bamba, Jamba, GraniteMoeHybrid with only linear-attention layers)
        inner.use_cache = False
    built = _inputs(model, config, task)
    built.notes[:0] = notes
    built.directory = directory
    return built


def _model_class(transformers: Any, config: Any, task: str | None, directory: Path) -> tuple[Any, str]:
    if task is not None:
        return getattr(transformers, AUTO_CLASSES[task]), task
    for architecture in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, architecture, None)
        if cls is not None:
            return cls, _task_of(architecture)
    raise UserError(
        f"{directory / 'config.json'} names no architecture transformers knows",
        f"give the task: --task {'|'.join(AUTO_CLASSES)}",
    )


def _task_of(architecture: str) -> str:
    for fragment, task in CLASS_TASKS:
        if fragment in architecture:
            return task
    return "other"


def _from_config(cls: Any, config: Any) -> Any:
    if cls.__name__.startswith("Auto"):
        return cls.from_config(config)
    return cls(config)


def _with_adapter(model: Any, adapter: Path) -> Any:
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(
            f"--adapter {adapter} has no adapter_config.json", "give the folder PeftModel.save_pretrained wrote"
        )
    peft = library("peft")
    return calling(
        f"loading the adapter {adapter}",
        lambda: peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=True, local_files_only=True),
    )


def _inputs(model: Any, config: Any, task: str) -> Built:
    import torch

    from gradcheck_cli.batch import Batches
    from gradcheck_cli.options import DEFAULT_BATCH_SIZE

    text = getattr(config, "get_text_config", lambda: config)()
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or SEQUENCE_LENGTH
    length = max(2, min(SEQUENCE_LENGTH, int(limit)))
    labels = int(getattr(config, "num_labels", 2) or 2)
    if task == "seq-cls" and getattr(config, "pad_token_id", None) is None:
        # GPT-2-style classifiers find each sequence's last token by the pad id; the synthetic ids use none
        model.config.pad_token_id = getattr(config, "eos_token_id", None) or 0
    # a base model without a head (Dinov2Model, BertModel): its inputs without labels, and --loss auto then
    # projects its output on a fixed random direction (resolve/losses.py)
    reads = _keyword_inputs(model) if task == "other" else set()
    images = task == "image-cls" or "pixel_values" in reads
    unlabelled = " (no labels: a base model)" if task == "other" else ""
    if images:
        size = getattr(config, "image_size", 224)
        size = int(size[0] if isinstance(size, list | tuple) else size)  # some configs give (height, width)
        channels = int(getattr(config, "num_channels", 3))
        description = f"standardised images {channels}x{size}x{size} (config.json)" + (
            unlabelled or f" and labels of {labels} classes"
        )

        def one(generator: torch.Generator, batch: int) -> dict[str, torch.Tensor]:
            item = {"pixel_values": torch.randn(batch, channels, size, size, generator=generator)}
            if task == "image-cls":
                item["labels"] = torch.randint(0, labels, (batch,), generator=generator)
            return item
    elif (task in ("causal-lm", "masked-lm", "seq-cls", "seq2seq") or "input_ids" in reads) and vocab > 0:
        description = f"token ids < {vocab} (vocab_size), {length} per sequence, attention masks" + (
            unlabelled or f", labels for {task}"
        )

        def one(generator: torch.Generator, batch: int) -> dict[str, torch.Tensor]:
            ids = torch.randint(0, vocab, (batch, length), generator=generator)
            item = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if task == "seq-cls":
                item["labels"] = torch.randint(0, labels, (batch,), generator=generator)
            elif task == "seq2seq":
                item["labels"] = torch.randint(0, vocab, (batch, max(1, length // 2)), generator=generator)
                if getattr(config, "decoder_start_token_id", None) is None:
                    # the model shifts labels right from decoder_start_token_id, which some configs leave out (T5's
                    # made by AutoConfig in transformers 5): shifted here from the pad id, as T5 starts
                    start = torch.full((batch, 1), int(getattr(config, "pad_token_id", None) or 0))
                    item["decoder_input_ids"] = torch.cat([start, item["labels"][:, :-1]], dim=1)
            elif task != "other":
                item["labels"] = ids.clone()  # the model shifts them itself (causal) or predicts them all (masked)
            return item
    else:
        raise UserError(
            f"cannot make inputs for {type(model).__name__} (task {task}) from its config",
            "give --data FILE.py:FN returning a dict of the model's keyword arguments, or choose --task",
        )

    def make(count: int, batch_size: int, seed: int) -> Batches:
        batch = (IMAGE_BATCH if images else TEXT_BATCH) if batch_size == DEFAULT_BATCH_SIZE else batch_size
        generator = torch.Generator().manual_seed(seed)
        from gradcheck_cli.resolve.data import collect_batches

        return collect_batches((one(generator, batch) for _ in range(count)), count)

    return Built(model, make, description, sequence_length=length)


def _keyword_inputs(model: Any) -> set[str]:
    """The keyword arguments a model's forward names (none when its signature cannot be read)."""
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def text_batches(directory_label: str, built: Built, path: Path, count: int, batch_size: int) -> Any:
    """--data FILE.txt for an hf: language model: the text tokenised by the model's own tokenizer, cut into
    sequences of the synthetic length, labels the ids (the model shifts them)."""
    import torch

    from gradcheck_cli.files import input_file
    from gradcheck_cli.options import DEFAULT_BATCH_SIZE
    from gradcheck_cli.resolve.data import collect_batches

    input_file(path, "data file", "give the text file itself")
    directory = built.directory
    if directory is None or not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise UserError(
            f"{directory_label} has no tokenizer for --data {path.name}",
            "save the tokenizer beside the model (tokenizer.save_pretrained(DIR)), or give --data FILE.py:FN",
        )
    transformers = library("transformers")
    tokenizer = calling(
        "loading the tokenizer", lambda: transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    )
    ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"))["input_ids"]
    length = built.sequence_length or SEQUENCE_LENGTH
    batch = TEXT_BATCH if batch_size == DEFAULT_BATCH_SIZE else batch_size
    if len(ids) < length * batch:
        raise UserError(
            f"{path.name} holds {len(ids)} tokens, fewer than one batch ({batch} x {length})",
            "give more text, or a smaller --batch-size",
        )
    stream = torch.tensor(ids)
    sequences = stream[: len(ids) // length * length].view(-1, length)
    batches = [sequences[i : i + batch] for i in range(0, sequences.shape[0] - batch + 1, batch)]
    made = ({"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()} for b in batches)
    return collect_batches(list(made), count)
