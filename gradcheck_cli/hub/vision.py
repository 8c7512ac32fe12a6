"""timm:NAME and torchvision:NAME: image classifiers at random initialisation (pretrained weights are never
downloaded; --weights loads a local file), and standardised images of the size the model was made for."""

from __future__ import annotations

from typing import Any

from gradcheck_cli.errors import UserError, calling
from gradcheck_cli.hub import Built, library

DEFAULT_SIZE = 224  # ImageNet's crop, when the model does not say
IMAGE_BATCH = 8  # synthetic images per batch unless --batch-size says otherwise
HEADLESS_CLASSES = 1000  # the head a model without one gets (ImageNet's classes)


def build_timm(name: str) -> Built:
    timm = library("timm")
    if not timm.is_model(name):
        raise UserError(
            f"timm has no model named '{name}'",
            "list them with python -c \"import timm; print(timm.list_models('*resnet*'))\"",
        )
    model = calling(f"timm.create_model('{name}')", lambda: timm.create_model(name, pretrained=False))
    config = getattr(model, "pretrained_cfg", None) or {}
    channels, height, width = tuple(config.get("input_size", (3, DEFAULT_SIZE, DEFAULT_SIZE)))
    classes = int(getattr(model, "num_classes", config.get("num_classes", 0)) or 0)  # the model's own, first
    source = "timm pretrained_cfg input_size"
    if classes < 1:  # a feature extractor (a pretraining checkpoint's layout): give it a head, as fine-tuning does
        classes = HEADLESS_CLASSES
        model = calling(
            f"timm.create_model('{name}', num_classes={classes})",
            lambda: timm.create_model(name, pretrained=False, num_classes=classes),
        )
        source += f"; it has no classifier head, so it got one of {classes} classes, as fine-tuning adds"
    return _images(model, (channels, height, width), classes, source)


def build_torchvision(name: str) -> Built:
    torchvision = library("torchvision")
    models = torchvision.models
    classifiers = set(models.list_models(module=models))
    if name not in set(models.list_models()):
        raise UserError(
            f"torchvision has no model named '{name}'",
            'list them with python -c "import torchvision; print(torchvision.models.list_models())"',
        )
    if name not in classifiers:
        raise UserError(
            f"torchvision:{name} is not an image classifier: gradcheck synthesises inputs for classifiers only",
            "write a model file with build_model() and get_batch() for it",
        )
    model = calling(f"torchvision.models.get_model('{name}')", lambda: models.get_model(name, weights=None))
    size, source = DEFAULT_SIZE, "ImageNet's default"
    try:
        weights = list(models.get_model_weights(name))
    except (ValueError, KeyError):
        weights = []
    if weights:
        crop = getattr(weights[0].transforms(), "crop_size", None)
        if crop:
            size, source = int(crop[0]), "the crop of its weights' transforms"
    classes = int(getattr(model, "num_classes", 0) or _out_features(model) or 1000)
    return _images(model, (3, size, size), classes, source)


def _out_features(model: Any) -> int | None:
    import torch

    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return last[-1].out_features if last else None


def _images(model: Any, shape: tuple[int, int, int], classes: int, source: str) -> Built:
    import torch

    from gradcheck_cli.batch import Batch, Batches
    from gradcheck_cli.options import DEFAULT_BATCH_SIZE

    def make(count: int, batch_size: int, seed: int) -> Batches:
        size = IMAGE_BATCH if batch_size == DEFAULT_BATCH_SIZE else batch_size
        generator = torch.Generator().manual_seed(seed)
        return Batches(
            count,
            (
                Batch(
                    (torch.randn(size, *shape, generator=generator),),  # standardised: what Normalize gives
                    {},
                    torch.randint(0, classes, (size,), generator=generator),
                )
                for _ in range(count)
            ),
        )

    channels, height, width = shape
    description = f"standardised images {channels}x{height}x{width} ({source}) and labels of {classes} classes"
    return Built(model, make, description)
