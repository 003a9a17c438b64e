"""``deepcluster export-model RUN --format F -o FILE``: the trained backbone for plain PyTorch."""

from __future__ import annotations

import argparse

# The choices of deepcluster.export_model, repeated so that building the parser does not
# import torch; tests/test_export_model.py checks that the two agree.
FORMATS = ("safetensors", "torchscript", "onnx")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-model", help="write the trained backbone (safetensors, TorchScript or ONNX)",
                       description="Write the trained network of a run without the deepcluster package inside: "
                       "safetensors weights (loadable with the torch-only src/deepcluster/standalone.py, "
                       "torchvision's vgg16_bn for vgg16, or torch.hub via hubconf.py), or a TorchScript / "
                       "ONNX graph from normalised RGB images to the clustering features. See docs/EXPORT.md.")
    p.add_argument("run_dir", metavar="RUN", help="a `deepcluster train` --output-dir, or a checkpoint .pt file")
    p.add_argument("--format", choices=FORMATS, default="safetensors", help="safetensors (default), torchscript "
                   "or onnx (needs the onnx package)")
    p.add_argument("--output", "-o", required=True, metavar="FILE", help="the file to write")
    p.add_argument("--epoch", metavar="E|best", help="export RUN/checkpoint-epochE.pt or RUN/best.pt instead of "
                   "RUN/checkpoint.pt (the last epoch)")
    p.set_defaults(func=cmd_export_model)


def cmd_export_model(args: argparse.Namespace) -> int:
    from ..export_model import export_model

    print(export_model(args.run_dir, args.format, args.output, args.epoch))
    return 0
