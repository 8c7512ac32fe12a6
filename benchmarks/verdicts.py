"""The verdict on standard architectures, as a new user gets it: `gradcheck analyze TARGET --format json` on
model-hub targets at their default initialisation, with the synthetic inputs gradcheck makes for them.

    python benchmarks/verdicts.py [--only torchvision|timm|hf] [--models NAME ...] [--layers N] [--output FILE]

Every target is healthy by construction (a stock architecture as its library builds it): any error finding is a
false alarm, and warnings are counted. Prints one line per model (exit code, errors, warnings, the first
findings) and the totals. The Hugging Face models are small configs (4 layers, width 64) written to a temporary
folder and run with --from-config (--layers N: N blocks instead, the shallow copies); torchvision and timm ones
are full size at their own input resolution (about 45 minutes on 2 CPU cores for all). Needs torchvision, timm
and transformers (see README, Development).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

TORCHVISION = [
    "alexnet",
    "squeezenet1_0",
    "squeezenet1_1",
    "vgg11",
    "vgg11_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
    "googlenet",
    "inception_v3",
    "resnet34",
    "resnet50",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "densenet121",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mnasnet1_0",
    "mnasnet0_5",
    "shufflenet_v2_x1_0",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "regnet_y_1_6gf",
    "convnext_tiny",
    "swin_t",
    "swin_v2_t",
    "maxvit_t",
    "vit_b_32",
    "vit_b_16",
]

TIMM = [
    "resnet50d",
    "seresnext26d_32x4d",
    "mobilenetv3_small_100",
    "mobilenetv4_conv_small",
    "ghostnet_100",
    "regnety_002",
    "rexnet_100",
    "dla34",
    "hrnet_w18_small",
    "vit_tiny_patch16_224",
    "deit3_small_patch16_224",
    "cait_xxs24_224",
    "swin_tiny_patch4_window7_224",
    "convnextv2_atto",
    "poolformer_s12",
    "coatnet_nano_rw_224",
    "maxvit_nano_rw_256",
    "levit_128s",
    "efficientformer_l1",
    "resmlp_12_224",
    "gmlp_ti16_224",
    "nf_resnet26",
    "xcit_nano_12_p16_224",
    "pvt_v2_b0",
    "mobilevit_xxs",
    "edgenext_xx_small",
    "fastvit_t8",
    "lcnet_050",
    "repvgg_a0",
    "cspresnet50",
    "sequencer2d_s",
    "efficientvit_b0",
    "hiera_tiny_224",
    "eva02_tiny_patch14_224",
    "skresnet18",
    "halonet26t",
    "mambaout_femto",
    "starnet_s1",
    "hgnetv2_b0",
    "davit_tiny",
]

_BASE = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=512,
    max_position_embeddings=128,
)
_GQA = dict(_BASE, num_key_value_heads=2)
_HF: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2LMHeadModel", dict(n_embd=64, n_layer=4, n_head=4, vocab_size=512, n_positions=128)),
    "gpt_neo": (
        "GPTNeoForCausalLM",
        dict(
            hidden_size=64,
            num_layers=4,
            num_heads=4,
            attention_types=[[["global", "local"], 2]],
            vocab_size=512,
            max_position_embeddings=128,
        ),
    ),
    "gptj": ("GPTJForCausalLM", dict(n_embd=64, n_layer=4, n_head=4, rotary_dim=8, vocab_size=512, n_positions=128)),
    "opt": (
        "OPTForCausalLM",
        dict(_BASE, ffn_dim=128, word_embed_proj_dim=64),
    ),
    "bloom": ("BloomForCausalLM", dict(hidden_size=64, n_layer=4, n_head=4, vocab_size=512)),
    "falcon": ("FalconForCausalLM", _BASE),
    "llama": ("LlamaForCausalLM", _GQA),
    "mistral": ("MistralForCausalLM", _GQA),
    "qwen2": ("Qwen2ForCausalLM", _GQA),
    "qwen3": ("Qwen3ForCausalLM", dict(_GQA, head_dim=16)),
    "phi": ("PhiForCausalLM", _BASE),
    "gemma": ("GemmaForCausalLM", dict(_GQA, head_dim=16)),
    "gemma2": ("Gemma2ForCausalLM", dict(_GQA, head_dim=16)),
    "olmo": ("OlmoForCausalLM", _BASE),
    "gpt_bigcode": ("GPTBigCodeForCausalLM", dict(n_embd=64, n_layer=4, n_head=4, vocab_size=512, n_positions=128)),
    "mixtral": ("MixtralForCausalLM", dict(_GQA, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeForCausalLM",
        dict(_GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128),
    ),
    "mamba": ("MambaForCausalLM", dict(hidden_size=64, num_hidden_layers=4, vocab_size=512, state_size=8)),
    "bert": ("BertForMaskedLM", _BASE),
    "roberta": ("RobertaForMaskedLM", dict(_BASE, max_position_embeddings=130)),
    "distilbert": (
        "DistilBertForMaskedLM",
        dict(dim=64, n_layers=4, n_heads=4, hidden_dim=128, vocab_size=512, max_position_embeddings=128),
    ),
    "albert": ("AlbertForMaskedLM", dict(_BASE, embedding_size=32)),
    "electra": ("ElectraForMaskedLM", dict(_BASE, embedding_size=32)),
    "deberta-v2": ("DebertaV2ForMaskedLM", _BASE),
    "bart": (
        "BartForConditionalGeneration",
        dict(
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            vocab_size=512,
            max_position_embeddings=128,
        ),
    ),
    "vit": (
        "ViTForImageClassification",
        dict(_BASE, image_size=32, patch_size=4, num_labels=10),
    ),
    "deit": ("DeiTForImageClassification", dict(_BASE, image_size=32, patch_size=4, num_labels=10)),
    "swin": (
        "SwinForImageClassification",
        dict(embed_dim=24, depths=[2, 2], num_heads=[2, 4], image_size=32, patch_size=2, window_size=4, num_labels=10),
    ),
    "convnext": (
        "ConvNextForImageClassification",
        dict(hidden_sizes=[24, 48, 96, 192], depths=[2, 2, 2, 2], image_size=64, num_labels=10),
    ),
    "resnet": (
        "ResNetForImageClassification",
        dict(
            embedding_size=32,
            hidden_sizes=[32, 64, 128, 256],
            depths=[2, 2, 2, 2],
            layer_type="basic",
            image_size=64,
            num_labels=10,
        ),
    ),
}


# the config keys that set a Hugging Face model's depth (--layers), by model family
_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers")


def hf_targets(folder: Path, names: list[str] | None, layers: int | None = None) -> list[str]:
    from gradcheck_cli.hub import import_torchvision

    import_torchvision()  # transformers imports torchvision when it is installed: its op schemas first
    from transformers import AutoConfig

    targets = []
    for model_type, (architecture, settings) in _HF.items():
        if names and model_type not in names:
            continue
        if layers is not None:
            settings = {key: layers if key in _DEPTH_KEYS else value for key, value in settings.items()}
            if "attention_types" in settings:  # GPT-Neo: one attention type per layer
                settings["attention_types"] = [[["global"], layers]]
            if "depths" in settings:  # Swin: blocks per stage
                settings["depths"] = [min(depth, layers) for depth in settings["depths"]]
        config = AutoConfig.for_model(model_type, architectures=[architecture], **settings)
        config.save_pretrained(folder / model_type)
        targets.append(f"hf:{folder / model_type}")
    return targets


def run(target: str) -> str:
    command = ["gradcheck", "analyze", target, "--format", "json", "--quiet"]
    command += ["--from-config"] if target.startswith("hf:") else []
    start = time.perf_counter()
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=1800, env=dict(os.environ, PYTHONWARNINGS="ignore")
    )
    took = time.perf_counter() - start
    label = target if not target.startswith("hf:") else "hf:" + Path(target[3:]).name
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        return f"{label:36s} exit {result.returncode} no report: {result.stderr.strip()[-300:]}"
    errors = [f for f in report["findings"] if f["severity"] == "error"]
    warnings = [f for f in report["findings"] if f["severity"] == "warning"]
    lines = [f"{label:36s} exit {result.returncode} errors {len(errors):3d} warnings {len(warnings):3d} {took:5.0f} s"]
    lines += [
        f"    {f['severity']} {f['layer']} {f['kind']} [{f['view']}]: {f['message'][:140]}" for f in errors + warnings
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["torchvision", "timm", "hf"], action="append")
    parser.add_argument("--models", nargs="*", help="only these names (torchvision/timm names, hf model types)")
    parser.add_argument("--output", type=Path)
    parser.add_argument(
        "--layers", type=int, help="Hugging Face models with this many blocks (default 4): shallow copies"
    )
    args = parser.parse_args()
    families = args.only or ["torchvision", "timm", "hf"]
    with tempfile.TemporaryDirectory() as folder:
        targets = []
        if "torchvision" in families:
            targets += [f"torchvision:{m}" for m in TORCHVISION if not args.models or m in args.models]
        if "timm" in families:
            targets += [f"timm:{m}" for m in TIMM if not args.models or m in args.models]
        if "hf" in families:
            targets += hf_targets(Path(folder), args.models, args.layers)
        lines = []
        for target in targets:
            line = run(target)
            print(line, flush=True)
            lines.append(line)
    report(lines, args.output)


def report(lines: list[str], output: Path | None) -> None:
    """The totals of run()'s lines, printed and, with the lines, written to `output`."""
    heads = [line.splitlines()[0].split() for line in lines]
    counted = [h for h in heads if "errors" in h]
    errors = sum(int(h[h.index("errors") + 1]) for h in counted)
    warnings = sum(int(h[h.index("warnings") + 1]) for h in counted)
    failing = sum(h[h.index("exit") + 1] != "0" for h in heads)
    summary = f"{len(heads)} models: {errors} errors, {warnings} warnings, {failing} not exiting 0"
    print(summary)
    if output:
        output.write_text("\n".join([*lines, summary]) + "\n")


if __name__ == "__main__":
    main()
