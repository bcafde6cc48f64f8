"""Regenerate examples/workloads/*.toml by running each model in examples/models once.

python examples/make_workloads.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from tvmlayers.tuning.extract import extract_workloads
from tvmlayers.tuning.workloads import save_workloads

HERE = Path(__file__).resolve().parent

# model file -> ops kept in its workload file (the tuning targets of the benchmark)
MODELS = {
    "resnet18": ("conv2d", "max_pool2d", "linear"),
    "mobilenetv2": ("conv2d",),
    "vgg_block": ("conv2d", "max_pool2d", "relu"),
    "bert_ffn": ("linear",),
    "small_cnn": ("conv2d", "max_pool2d", "linear", "relu"),
}


def load_model_file(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    for name, ops in MODELS.items():
        module = load_model_file(HERE / "models" / f"{name}.py")
        torch.manual_seed(0)
        workloads = extract_workloads(module.model(), torch.randn(module.INPUT_SHAPE))
        workloads = [w for w in workloads if w.op in ops]
        save_workloads(workloads, HERE / "workloads" / f"{name}.toml", name=name)
        print(f"{name}: {len(workloads)} workloads")


if __name__ == "__main__":
    main()
