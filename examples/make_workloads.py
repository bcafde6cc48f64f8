"""Regenerate examples/workloads/*.toml by running each model in examples/models once.

python examples/make_workloads.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import tvmlayers as tl
from tvmlayers.extract import extract_workloads
from tvmlayers.workloads import save_workloads

HERE = Path(__file__).resolve().parent

# model file -> (ops kept in its workload file, record the tvmlayers.convert-ed model: fused conv+relu)
MODELS = {
    "resnet18": (("conv2d", "max_pool2d", "linear", "relu"), False),
    "mobilenetv2": (("conv2d",), False),
    "vgg_block": (("conv2d", "max_pool2d", "relu"), True),
    "bert_ffn": (("linear",), False),
    "small_cnn": (("conv2d", "max_pool2d", "linear", "relu"), False),
    "odd_channels": (("conv2d",), False),
}


def load_model_file(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    for name, (ops, fused) in MODELS.items():
        module = load_model_file(HERE / "models" / f"{name}.py")
        torch.manual_seed(0)
        model = tl.convert(module.model()) if fused else module.model()
        workloads = extract_workloads(model, torch.randn(module.INPUT_SHAPE))
        workloads = [w for w in workloads if w.op in ops]
        save_workloads(workloads, HERE / "workloads" / f"{name}.toml", name=name)
        print(f"{name}: {len(workloads)} workloads")


if __name__ == "__main__":
    main()
