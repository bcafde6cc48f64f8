"""The CUDA target presets: their attributes, keys, toolchains and whether they run here, with no GPU on this
machine.  What a machine with a GPU would see is simulated where torch reports the GPU (its compute capability)."""

from __future__ import annotations

import pytest
import torch
import tvm

from tvmlayers.cli import main
from tvmlayers.targets import (
    CUDA_PRESETS,
    PRESETS,
    device_type,
    host_arch,
    resolve_target,
    runs_here,
    target_arch,
    target_key,
    toolchains,
)

# preset -> (arch, key, host triple, host cpu)
EXPECTED = {
    "sm_80": ("sm_80", "cuda-sm_80", "x86_64-linux-gnu", None),
    "sm_86": ("sm_86", "cuda-sm_86", "x86_64-linux-gnu", None),
    "sm_89": ("sm_89", "cuda-sm_89", "x86_64-linux-gnu", None),
    "sm_90": ("sm_90", "cuda-sm_90", "x86_64-linux-gnu", None),
    "jetson-orin": ("sm_87", "cuda-sm_87-aarch64", "aarch64-linux-gnu", "cortex-a78"),
}


def test_every_gpu_preset_is_listed():
    assert set(CUDA_PRESETS) == set(EXPECTED) and "cuda" in PRESETS


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_cuda_presets_carry_what_metaschedule_and_the_gpu_rules_read(name):
    arch, key, triple, cpu = EXPECTED[name]
    target = resolve_target(name)
    assert target.kind.name == "cuda" and str(target.attrs["arch"]) == arch
    assert target_key(target) == key
    # the values of TVM's own tags for these GPUs (nvidia/nvidia-a100, nvidia/jetson-agx-orin-64gb, ...)
    tag = tvm.target.Target("nvidia/jetson-agx-orin-64gb" if name == "jetson-orin" else "nvidia/nvidia-a100")
    for attr in ("max_threads_per_block", "max_num_threads", "thread_warp_size", "max_shared_memory_per_block",
                 "registers_per_block"):  # fmt: skip
        assert int(target.attrs[attr]) == int(tag.attrs[attr]), attr
    assert str(target.host.attrs["mtriple"]) == triple
    assert (str(target.host.attrs["mcpu"]) if "mcpu" in target.host.attrs else None) == cpu
    assert target_arch(target) == triple.split("-")[0]
    assert device_type(target) == "cuda"


X86_HOST = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}


def test_cuda_keys_tell_hosts_apart_and_do_not_depend_on_extra_attributes():
    orin = resolve_target("jetson-orin")
    x86_sm87 = tvm.target.Target({"kind": "cuda", "arch": "sm_87", "host": X86_HOST})
    assert target_key(orin) != target_key(x86_sm87) == "cuda-sm_87"
    # a user's dict without the limits is the same code-generation target as the preset
    bare = tvm.target.Target({"kind": "cuda", "arch": "sm_90", "host": X86_HOST})
    assert target_key(bare) == target_key(resolve_target("sm_90"))


def test_cuda_toolchains_are_nvcc_and_the_hosts_linker():
    sm90 = [t.compiler for t in toolchains(resolve_target("sm_90"))]
    orin = [t.compiler for t in toolchains(resolve_target("jetson-orin"))]
    assert sm90 == ["nvcc", "x86_64-linux-gnu-gcc"]
    assert orin == ["nvcc", "aarch64-linux-gnu-gcc"]
    assert [t.compiler for t in toolchains(resolve_target("rasp4b"))] == ["aarch64-linux-gnu-gcc"]


def test_without_a_gpu_cuda_names_the_gpu_presets_and_nothing_runs_here():
    assert not torch.cuda.is_available()  # this test describes a machine without a GPU
    with pytest.raises(ValueError, match="torch sees none.*sm_80, sm_86, sm_89, sm_90, jetson-orin"):
        resolve_target("cuda")
    for name in EXPECTED:
        assert not runs_here(resolve_target(name))


def _pretend_gpu(monkeypatch, capability: tuple[int, int]) -> None:
    """torch reports a GPU of ``capability`` (the machine has none; only torch's answers change)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_cuda_on_a_machine_with_an_h100_is_the_sm_90_preset(monkeypatch):
    _pretend_gpu(monkeypatch, (9, 0))
    local = PRESETS["cuda"][1]()  # not resolve_target: it caches by name for the process
    if host_arch() == "x86_64":
        assert local == PRESETS["sm_90"][1]()
    assert local["arch"] == "sm_90" and local["host"]["mtriple"] == f"{host_arch()}-linux-gnu"


def test_cuda_on_a_gpu_without_a_preset_still_gets_the_limits(monkeypatch):
    _pretend_gpu(monkeypatch, (7, 5))  # a T4
    target = tvm.target.Target(PRESETS["cuda"][1]())
    assert str(target.attrs["arch"]) == "sm_75" and int(target.attrs["max_threads_per_block"]) == 1024
    assert target_key(target) == "cuda-sm_75" + ("" if host_arch() == "x86_64" else f"-{host_arch()}")


def test_runs_here_needs_the_gpus_architecture_and_the_hosts(monkeypatch):
    _pretend_gpu(monkeypatch, (9, 0))
    assert runs_here(resolve_target("sm_90")) == (host_arch() == "x86_64")
    assert not runs_here(resolve_target("sm_80"))
    assert runs_here(tvm.target.Target("nvidia/nvidia-h100")) == (host_arch() == "x86_64")  # sm_90a: a 9.0 GPU
    _pretend_gpu(monkeypatch, (8, 7))
    assert runs_here(resolve_target("jetson-orin")) == (host_arch() == "aarch64")


def test_a_broken_cuda_runtime_reads_as_no_gpu(monkeypatch):
    def broken(device=None):
        raise RuntimeError("Found no NVIDIA driver on your system")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", broken)
    assert not runs_here(resolve_target("sm_90"))
    with pytest.raises(ValueError, match="torch sees none"):
        PRESETS["cuda"][1]()


def test_targets_command_lists_the_gpu_presets_with_nvcc(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert "torch sees none" in lines["cuda"]
    for name, (arch, key, _, _) in EXPECTED.items():
        assert lines[name].split()[1] == key
        block = out[out.index(lines[name]) :].splitlines()[2]
        assert "toolchain nvcc (" in block and f"no {arch} GPU here" in block
