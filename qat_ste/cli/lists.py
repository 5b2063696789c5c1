"""``qat-ste list-stes`` and ``qat-ste list-models``."""

from __future__ import annotations

import argparse

from .output import EXIT_OK, _out


def _list_stes(args: argparse.Namespace) -> int:
    from ..ste import get_ste, list_stes

    names = list_stes()
    width = max(len(n) for n in names)
    for name in names:
        _out(f"{name.ljust(width)}  {get_ste(name).description}")
    return EXIT_OK


def _list_models(args: argparse.Namespace) -> int:
    from ..zoo import ZOO_MODELS

    _out("zoo models (--model zoo:NAME):")
    width = max(len(n) for n in ZOO_MODELS)
    for name in sorted(ZOO_MODELS):
        doc = (ZOO_MODELS[name].__doc__ or "").strip().splitlines()
        _out(f"  {name.ljust(width)}  {doc[0] if doc else ''}")
    _out("\ntorchvision:NAME  any name of torchvision.models.list_models() (e.g. resnet18, mobilenet_v3_small)")
    _out("timm:NAME         any name of timm.list_models() (e.g. resnet18, efficientnet_b0), if timm is installed")
    _out("All are built with random weights for the data's classes and channels; start from a local state dict "
         "with --weights FILE (nothing is downloaded).")
    return EXIT_OK
