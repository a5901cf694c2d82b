"""``adaptok-train``: :func:`adaptok.train.train` from the command line.

Examples::

    adaptok-train --model vit_tiny_patch16_224 --model-arg img_size=28 --model-arg patch_size=2 \\
        --model-arg in_chans=1 --epochs 20 --out runs/p14
    adaptok-train --config my_run.json --seed 1 --out runs/p14-s1
    adaptok-train --config my_run.json --method evit --method-arg keep_rate=0.7 --method-arg prune_layers=[1,3,5]
    torchrun --nproc_per_node 2 -m adaptok.train --config my_run.json   # DDP, gloo on CPU

A ``--config`` JSON file holds :class:`adaptok.train.TrainConfig` fields;
flags given on the command line override it. A run whose ``out`` holds a
checkpoint resumes from it (``--no-resume`` refuses to and starts over).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
from typing import Optional, Sequence


_DICTS = ("model_kwargs", "method_args", "aug")  # set by repeatable KEY=VALUE flags


def key_value(text: str) -> tuple:
    """``"key=value"`` -> ``(key, value)``, the value read as a Python
    literal when it is one (``2``, ``0.7``, ``True``, ``[1, 7]``), else kept
    as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    return key.replace("-", "_"), value


def _parser() -> argparse.ArgumentParser:
    from .loop import TrainConfig

    p = argparse.ArgumentParser(prog="adaptok-train", description="Train a timm ViT with adaptok (the lab).",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("::")[1])
    p.add_argument("--config", help="a JSON file of TrainConfig fields (flags override it)")
    types = {f.name: f for f in dataclasses.fields(TrainConfig)}
    helps = {"model": "timm model name", "init": "initial weights (a checkpoint)", "data":
             "'animal-mnist' or an ImageFolder root", "limit": "use only the first N training images",
             "out": "output directory (last.pth, log.jsonl)", "batch_size": "global batch size",
             "amp": "bf16 autocast", "eval_every": "validate every N epochs (0: never)"}
    for name, f in types.items():
        if name in _DICTS:
            continue
        flag = "--" + name.replace("_", "-")
        if str(f.type) in ("bool", "Optional[bool]"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helps.get(name))
        else:
            kind = {"int": int, "float": float, "Optional[int]": int, "Optional[float]": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=None, help=helps.get(name))
    p.add_argument("--model-arg", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="a timm.create_model keyword (repeatable), e.g. img_size=28")
    p.add_argument("--method-arg", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="a method keyword (repeatable), e.g. keep_rate=0.7")
    p.add_argument("--aug", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="a timm.data.create_loader transform keyword (repeatable), e.g. no_aug=True")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    return p


def config_from_args(argv: Optional[Sequence[str]] = None):
    """``(TrainConfig, device)`` from the command line."""
    from .loop import TrainConfig

    args = _parser().parse_args(argv)
    fields = {}
    if args.config:
        try:
            with open(args.config) as f:
                fields = json.load(f)
        except FileNotFoundError:
            raise SystemExit(f"adaptok-train: --config {args.config!r} does not exist") from None
        fields.pop("comment", None)
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None and f.name not in _DICTS:
            fields[f.name] = value
    for name, pairs in zip(_DICTS, (args.model_arg, args.method_arg, args.aug)):
        if pairs:
            fields[name] = {**fields.get(name, {}), **dict(pairs)}
    try:
        return TrainConfig(**fields), args.device
    except TypeError as e:
        raise SystemExit(f"adaptok-train: --config {args.config!r}: {e}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .loop import train

    config, device = config_from_args(argv)
    try:
        result = train(config, device=device)
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"adaptok-train: {e}", file=sys.stderr)
        return 2
    last = result["records"][-1] if result["records"] else {}
    print(json.dumps({"checkpoint": result["checkpoint"], **last}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
