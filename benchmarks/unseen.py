"""The third try on unseen models (README, Checked against theory): standard architectures that neither the tests
nor benchmarks/verdicts.py hold, run as verdicts.py runs its own (`gradcheck analyze TARGET --format json`).

    python benchmarks/unseen.py [--set third|fourth|fifth|sixth|seventh] [--only torchvision|timm|hf] [--output FILE]

timm and torchvision models are full size at their own resolution; each Hugging Face type gets one generic small
config (width 64, 4 layers, a vocabulary of 512; the keys its config class has), so a few types do not run from
it (their pad or end ids above the vocabulary, rope settings it leaves out: exit 2 with one line). Every model is
healthy by construction at its library's default initialisation: an error is a false alarm unless the finding
is true of the model (README: SwiftFormer's softmax over a dimension of size 1). About 50 minutes on 2 cores.
The sixth set is torchvision's segmentation, video and optical-flow models, each as a model file (TV_SIXTH); the
seventh, timm models and Hugging Face text types of families none of the others held.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from verdicts import _BASE, _HF, report, run

TIMM = [
    "mobilevit_xxs",
    "mobilevitv2_050",
    "edgenext_xx_small",
    "repvit_m0_9",
    "hgnetv2_b0",
    "cspresnet50",
    "xception41",
    "inception_v4",
    "nf_resnet26",
    "gcvit_xxtiny",
    "davit_tiny",
    "coat_tiny",
    "pvt_v2_b0",
    "efficientformerv2_s0",
    "mobileone_s0",
    "resnetv2_50",
    "skresnet18",
    "lcnet_050",
    "mobilenetv1_100",
    "semnasnet_050",
    "swinv2_tiny_window8_256",
    "nest_tiny",
    "starnet_s1",
    "mambaout_femto",
    "efficientvit_b0",
    "vitamin_small_224",
    "mixer_b16_224",
    "legacy_seresnet18",
    "fastvit_sa12",
    "hgnet_tiny",
    "eva02_small_patch14_224",
    "test_vit",
    "test_efficientnet",
    "test_byobnet",
    "beit_base_patch16_224",
    "inception_resnet_v2",
    "seresnext26ts",
    "eca_resnext26ts",
    "gcresnet33ts",
    "resnet51q",
    "convnext_nano",
    "regnetz_b16",
    "resnest14d",
    "rexnetr_100",
    "efficientnet_b1",
    "mobilenetv4_hybrid_medium",
    "flexivit_small",
    "deit_tiny_patch16_224",
    "xcit_tiny_12_p16_224",
    "convformer_s18",
    "hrnet_w18_small_v2",
    "dla46_c",
    "dpn48b",
    "nfnet_l0",
    "eca_nfnet_l0",
    "mixnet_s",
    "vgg11_bn",
    "tf_efficientnetv2_b0",
    "resnetaa50d",
]

TORCHVISION = [
    "resnet101",
    "regnet_y_800mf",
    "regnet_x_3_2gf",
    "mnasnet1_3",
    "shufflenet_v2_x2_0",
    "mobilenet_v3_small",
    "efficientnet_b2",
    "densenet169",
    "swin_s",
    "wide_resnet101_2",
    "resnext101_32x8d",
]

HF = [
    "apertus",
    "arcee",
    "bamba",
    "big_bird",
    "bitnet",
    "blenderbot",
    "camembert",
    "cohere2",
    "dbrx",
    "deepseek_v3",
    "dinov2",
    "doge",
    "ernie4_5",
    "exaone4",
    "fnet",
    "gemma3_text",
    "glm",
    "glm4",
    "granitemoehybrid",
    "helium",
    "hunyuan_v1_dense",
    "ibert",
    "ijepa",
    "jamba",
    "jetmoe",
    "led",
    "lfm2",
    "longformer",
    "longt5",
    "m2m_100",
    "ministral",
    "mobilenet_v2",
    "modernbert",
    "mra",
    "mt5",
    "olmo3",
    "olmoe",
    "phimoe",
    "plbart",
    "roformer",
    "seed_oss",
    "smollm3",
    "swiftformer",
    "switch_transformers",
    "umt5",
    "vit_msn",
    "xlm",
    "yoso",
]

# The fourth try (a later session): timm families and Hugging Face types none of the lists above, the tests or
# benchmarks/verdicts.py hold (`--set fourth`).
TIMM_FOURTH = [
    "convit_tiny", "convmixer_768_32", "cpubone_nano", "crossvit_tiny_240", "cspnext_tiny", "efficientvim_m1",
    "efficientvit_m0", "fasternet_t0", "focalnet_tiny_srf", "hardcorenas_b", "iformer_t", "inception_next_atto",
    "lcnetv2_small", "lowformer_b0", "mvitv2_tiny", "nextvit_small", "pit_ti_224", "rdnet_tiny", "repghostnet_050",
    "res2next50", "selecsls42", "shvit_s1", "swiftformer_xs", "swinv2_cr_tiny_224", "tiny_vit_5m_224",
    "tnt_s_legacy_patch16_224", "tresnet_m", "twins_svt_small", "visformer_tiny", "vit_tiny_r_s16_p8_224",
    "test_vit_relpos", "volo_d1_224", "ese_vovnet19b_slim_dw", "legacy_xception",
]  # fmt: skip

HF_FOURTH = [
    "biogpt", "codegen", "convbert", "ctrl", "deberta", "diffllama", "ernie", "esm", "falcon_h1", "falcon_mamba",
    "flaubert", "fsmt", "funnel", "gpt_neox", "granite", "granitemoe", "hgnet_v2", "imagegpt", "internlm3", "levit",
    "luke", "mamba2", "marian", "mbart", "megatron-bert", "mobilebert", "mobilevit", "mpnet", "mpt", "mvp",
    "nemotron", "nystromformer", "openai-gpt", "pegasus", "persimmon", "phi3", "poolformer", "prophetnet",
    "qwen3_moe", "recurrent_gemma", "reformer", "regnet", "rembert", "rwkv", "squeezebert", "stablelm",
    "starcoder2", "swinv2", "xglm", "xlnet", "xlstm", "zamba", "zamba2", "cvt", "efficientnet", "convnextv2",
    "beit", "bit", "data2vec-text", "nemotron_h", "qwen3_next", "kimi_linear", "minimax", "exaone", "cohere",
    "olmo2", "gemma3n_text", "xlm-roberta", "roberta-prelayernorm", "pvt",
]  # fmt: skip

# The fifth try (2026-12-04): one model of each timm family and the Hugging Face text and vision types that none
# of the lists above, the tests, benchmarks/verdicts.py or the README name (`--set fifth`); the largest
# (billion-parameter ViTs, NASNet-A large at 331 px) left out for time.
TIMM_FIFTH = [
    "bat_resnext26ts", "botnet26t_256", "caformer_s18", "coatnext_nano_rw_224", "cs3darknet_focus_s", "csatv2",
    "darknet17", "densenetblur121d", "ecaresnetlight", "efficientnetv2_rw_t", "fbnetv3_b", "gernet_s",
    "ghostnetv3_050", "gmixer_12_224", "haloregnetz_b", "hieradet_small", "lambda_resnet26t",
    "maxxvit_rmlp_nano_rw_256", "maxxvitv2_nano_rw_256", "mnasnet_small", "mobilenet_edgetpu_v2_xs",
    "poolformerv2_s12", "qwen3_vit_88m", "regnetx_002", "resnetblur18", "resnetrs50", "sam2_hiera_tiny",
    "sebotnet33ts_256", "sedarknet21", "sehalonet33ts", "seresnet33ts", "skresnext50_32x4d", "spnasnet_100",
    "tinynet_e", "vovnet39a",
]  # fmt: skip

HF_FIFTH = [
    "afmoe", "apertus1p5_text", "bert-generation", "bigbird_pegasus", "blenderbot-small", "cohere2_moe", "cpmant",
    "data2vec-vision", "deepseek_v2", "dinat", "dinov2_with_registers", "dots1", "ernie4_5_moe", "eurobert",
    "exaone_moe", "flex_olmo", "gemma4_text", "glm4_moe", "gpt_neox_japanese", "gpt_oss", "granitemoeshared",
    "hunyuan_v1_moe", "jais2", "layoutlm", "lfm2_moe", "llama4_text", "minicpm3", "ministral3", "mobilenet_v1",
    "mobilevitv2", "modernbert-decoder", "nanochat", "nomic_bert", "pegasus_x", "pvt_v2", "qwen3_5_text",
    "roc_bert", "segformer", "t5gemma", "textnet", "vaultgemma", "xlm-roberta-xl", "xmod", "tapas", "pp_lcnet",
]  # fmt: skip

# The seventh try (2026-12-07): timm models and Hugging Face types that no earlier list, the tests or verdicts.py
# held, chosen before any of them ran (the single-modality text types with an LM head; the rest need inputs of
# their own).
TIMM_SEVENTH = [
    "ghostnetv2_100", "repghostnet_100", "tinynet_a", "tf_efficientnet_lite0", "hardcorenas_a", "res2net50_14w_8s",
    "selecsls42b", "dpn68", "ese_vovnet19b_dw", "darknet53", "tnt_s_patch16_224", "inception_next_tiny",
    "resnetv2_50x1_bit", "ecaresnet26t", "cs3darknet_s", "dm_nfnet_f0", "vit_relpos_small_patch16_224",
    "vit_srelpos_small_patch16_224", "mixer_s16_224", "repvit_m1",
]  # fmt: skip

HF_SEVENTH = [
    "aria_text", "axk1", "axk2", "bailing_hybrid", "blt", "cohere_compass_text", "cwm", "deepseek_v32", "deepseek_v4",
    "dots3_note_text", "esmc", "flint", "focalnet", "gemma4_unified_text", "glm4_moe_lite", "glm_moe_dsa", "gpt-sw3",
    "granite_swa", "granitemoe_swa", "gte", "hrm_text", "hy_v3", "hy_v4", "inkling_text", "iquestcoder",
    "jina_embeddings_v3", "kolibri1", "laguna", "lara_mini", "lfm3", "longcat_flash", "mellum", "mimo_v2_flash",
    "minimax_m2", "nllb-moe", "olmo_hybrid", "qwen3_5_moe_text", "qwen4_exp_text", "sarvam_mla", "sarvam_moe",
    "solar_open", "ultrabert", "youtu", "zaya",
]  # fmt: skip

# The generic small config: each key that the type's config class has is set to this value (verdicts.py's
# decoder and encoder-decoder settings, and the keys of mixtures of experts, MLA attention and vision models).
SMALL: dict[str, Any] = dict(
    _BASE,
    **_HF["bart"][1],
    num_key_value_heads=2,
    head_dim=16,
    num_layers=4,
    num_heads=4,
    d_ff=128,
    d_kv=16,
    moe_intermediate_size=64,
    image_size=32,
    patch_size=4,
    num_labels=10,
    n_routed_experts=4,
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    shared_expert_intermediate_size=64,
    embedding_size=64,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    num_decoder_layers=2,
)

# The heads tried, in order: the first auto mapping that names the type gives its architecture.
_MAPPINGS = (
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
)


def _has(config: Any, key: str) -> bool:
    """Whether a config class has this key set (a per-layer one raises on global access: it has it)."""
    try:
        return getattr(config, key, None) is not None
    except Exception:  # transformers' AmbiguousGlobalPerLayerAttributeError
        return True


def hf_targets(folder: Path, types: list[str] = HF) -> list[str]:
    """hf:DIR targets, one folder per type with its generic small config.json (types it cannot make are named)."""
    from gradcheck_cli.hub import import_torchvision

    import_torchvision()
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto

    targets = []
    for model_type in types:
        names = [getattr(modeling_auto, mapping) for mapping in _MAPPINGS]
        architecture = next((found[model_type] for found in names if model_type in found), None)
        defaults = AutoConfig.for_model(model_type)
        settings = {key: value for key, value in SMALL.items() if _has(defaults, key)}
        if "depths" in vars(defaults):  # staged vision models: one block per stage
            stages = len(defaults.depths)
            settings["depths"] = [1] * stages
            if "hidden_sizes" in vars(defaults):
                settings["hidden_sizes"] = [16 * 2**i for i in range(stages)]
        try:
            config = AutoConfig.for_model(model_type, architectures=[architecture], **settings)
        except Exception as error:  # each config class validates its own keys in its own way
            print(f"hf:{model_type:33s} no config: {str(error).splitlines()[0][:120]}", flush=True)
            continue
        config.save_pretrained(folder / model_type)
        targets.append(f"hf:{folder / model_type}")
    return targets


# The sixth try: what torchvision builds besides classifiers, which `torchvision:NAME` does not synthesise
# inputs for, so each is a model file as a user writes it (build_model, get_batch and, where the output is not
# a tensor of logits, loss_fn): semantic segmentation (a dict output, per-pixel cross-entropy against random
# masks), video classification (clips of 16 frames), and optical flow (RAFT: a list of refinements, the loss
# over all of them as its paper weights them, gamma 0.8).
TV_SIXTH: dict[str, tuple[str, str, str]] = {
    name: (
        "segmentation",
        "torch.randn(4, 3, 128, 128, generator=g), torch.randint(0, 21, (4, 128, 128), generator=g)",
        'torch.nn.functional.cross_entropy(output["out"], targets)',
    )
    for name in ("fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")
}
TV_SIXTH |= {
    name: ("video", f"torch.randn(2, 3, 16, {size}, {size}, generator=g), torch.randint(0, 10, (2,), generator=g)", "")
    for name, size in (
        ("r3d_18", 112),
        ("mc3_18", 112),
        ("r2plus1d_18", 112),
        ("s3d", 224),
        ("swin3d_t", 224),
        ("mvit_v2_s", 224),
    )
}
TV_SIXTH |= {
    name: (
        "optical_flow",
        "(torch.randn(2, 3, 128, 128, generator=g), torch.randn(2, 3, 128, 128, generator=g)), "
        "torch.randn(2, 2, 128, 128, generator=g)",
        "sum(0.8 ** (len(output) - 1 - i) * (flow - targets).abs().mean() for i, flow in enumerate(output))",
    )
    for name in ("raft_small",)
}


def sixth_files(folder: Path) -> list[str]:
    """A model file per TV_SIXTH model, at its library's default initialisation (no weights)."""
    targets = []
    for name, (family, batch, loss) in TV_SIXTH.items():
        classes = (
            "" if family == "optical_flow" else ", num_classes=21" if family == "segmentation" else ", num_classes=10"
        )
        backbone = ", weights_backbone=None" if family == "segmentation" else ""
        text = (
            "import torch\n\nfrom gradcheck_cli.hub import import_torchvision\n\n"
            "torchvision = import_torchvision()\n\n\n"
            f"def build_model():\n    return torchvision.models.{family}.{name}(weights=None{backbone}{classes})\n\n\n"
            f"def get_batch():\n    g = torch.Generator().manual_seed(0)\n    return {batch}\n"
        )
        text += f"\n\ndef loss_fn(output, targets):\n    return {loss}\n" if loss else ""
        path = folder / f"tv_{name}.py"
        path.write_text(text)
        targets.append(str(path))
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["torchvision", "timm", "hf"], action="append")
    parser.add_argument(
        "--set", choices=["third", "fourth", "fifth", "sixth", "seventh"], default="third", help="which try's lists"
    )
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    families = args.only or ["torchvision", "timm", "hf"]
    lists = {
        "third": (TIMM, HF),
        "fourth": (TIMM_FOURTH, HF_FOURTH),
        "fifth": (TIMM_FIFTH, HF_FIFTH),
        "sixth": ([], []),
        "seventh": (TIMM_SEVENTH, HF_SEVENTH),
    }
    timm, hf = lists[args.set]
    lines = []
    with tempfile.TemporaryDirectory() as folder:
        third = args.set == "third"
        targets = [f"torchvision:{m}" for m in TORCHVISION] if "torchvision" in families and third else []
        targets += sixth_files(Path(folder)) if "torchvision" in families and args.set == "sixth" else []
        targets += [f"timm:{m}" for m in timm] if "timm" in families else []
        targets += hf_targets(Path(folder), hf) if "hf" in families else []
        for target in targets:
            lines.append(run(target))
            print(lines[-1], flush=True)
    report(lines, args.output)


if __name__ == "__main__":
    main()
