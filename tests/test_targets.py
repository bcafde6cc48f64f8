"""Target presets, the host's triple, which targets run here, and their toolchains."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

import tvmlayers as tl
from tvmlayers.cli import main
from tvmlayers.targets import (
    PRESETS,
    host_arch,
    missing_features,
    resolve_target,
    runs_here,
    target_arch,
    target_key,
    toolchain,
)

# preset -> (mtriple, mcpu or None, mattr it must name, num-cores or None)
EXPECTED = {
    "aarch64": ("aarch64-linux-gnu", None, {"+neon"}, 4),
    "rasp4b": ("aarch64-linux-gnu", "cortex-a72", {"+neon"}, 4),
    "rasp5": ("aarch64-linux-gnu", "cortex-a76", {"+neon"}, 4),
    "armv7": ("armv7a-linux-gnueabihf", None, {"+neon", "+vfp4"}, 4),
    "x86-avx512": ("x86_64-linux-gnu", "skylake-avx512", set(), None),
    "x86-avx2": ("x86_64-linux-gnu", "haswell", set(), None),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_target_dicts(name):
    triple, cpu, features, cores = EXPECTED[name]
    attrs = resolve_target(name).attrs
    assert str(attrs["mtriple"]) == triple
    assert (str(attrs["mcpu"]) if "mcpu" in attrs and str(attrs["mcpu"]) else None) == cpu
    assert features <= {str(f) for f in attrs.get("mattr", [])}
    assert (int(attrs["num-cores"]) if "num-cores" in attrs else None) == cores
    if name == "armv7":
        assert str(attrs["mfloat-abi"]) == "hard"


def test_every_preset_has_its_own_key():
    # x86: alias of host; cuda: of the local GPU's sm_XX preset (and an error without a GPU)
    keys = {name: target_key(resolve_target(name)) for name in PRESETS if name not in ("x86", "cuda")}
    assert len(set(keys.values())) == len(keys), keys


def test_host_is_this_machine():
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    host = resolve_target("host")
    assert str(host.attrs["mtriple"]) == f"{machine}-linux-gnu"
    assert host_arch() == machine and runs_here(host)
    assert str(host.attrs["mcpu"]) not in ("", "native", "generic")


def test_which_targets_run_here():
    arch = host_arch()
    for name in EXPECTED:
        target = resolve_target(name)
        assert runs_here(target) == (target_arch(target) == arch)
    assert target_arch(resolve_target("armv7")) == "arm"
    assert target_arch(resolve_target("rasp5")) == "aarch64"
    assert not runs_here(resolve_target("armv7"))  # no 32-bit ARM host runs tvmlayers


def test_toolchains_name_their_debian_packages():
    arm = toolchain(resolve_target("armv7"))
    assert arm.compiler == "arm-linux-gnueabihf-gcc"
    assert set(arm.packages) == {"gcc-arm-linux-gnueabihf", "libc6-dev-armhf-cross"}
    pi = toolchain(resolve_target("rasp4b"))
    assert pi.compiler == "aarch64-linux-gnu-gcc"
    native = host_arch() == "aarch64"
    assert pi.packages == (("gcc",) if native else ("gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"))
    assert toolchain(resolve_target("host")).packages == ("gcc",)


def test_missing_cross_compiler_names_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without any compiler
    tools = toolchain(resolve_target("armv7"))
    assert not tools.installed()
    with pytest.raises(RuntimeError, match="apt-get install gcc-arm-linux-gnueabihf libc6-dev-armhf-cross"):
        tools.require("compiling for armv7")


def test_targets_command_shows_each_toolchain_and_whether_it_is_installed(capsys, monkeypatch, tmp_path):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert f"\n{name} " in f"\n{out}"
    installed = shutil.which("aarch64-linux-gnu-gcc") is not None
    assert ("toolchain aarch64-linux-gnu-gcc (installed)" in out) == installed
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    assert "toolchain arm-linux-gnueabihf-gcc (missing: apt-get install gcc-arm-linux-gnueabihf" in out
    assert "(installed)" not in out


def test_modules_for_a_target_that_cannot_run_here_point_to_tvmlayers_compile():
    x = torch.randn(1, 3, 8, 8)
    conv = tl.Conv2d(3, 4, 3, target="rasp4b")
    with pytest.raises(RuntimeError, match="cannot run in this process.*tvmlayers compile"):
        conv(x)
    with pytest.raises(RuntimeError, match="tvmlayers compile"):
        tl.functional.relu(x, target="armv7")
    model = tl.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()), target="aarch64")
    with pytest.raises(RuntimeError, match="llvm-aarch64-linux-gnu"):
        model(x)
    # the same module on this machine still computes torch's result
    here = tl.Conv2d(3, 4, 3)
    here.load_state_dict(conv.state_dict())
    torch.testing.assert_close(here(x), F.conv2d(x, conv.weight.detach(), conv.bias.detach()))


def _x86_target_this_cpu_cannot_run() -> dict:
    """This CPU's own target plus an instruction set extension it lacks (which depends on the machine)."""
    host = dict(PRESETS["host"][1]())
    for extension in ("amx-fp16", "amx-complex", "avx512fp16", "amx-tile", "avx512vp2intersect"):
        target = {**host, "mattr": [f"+{extension}"]}
        if missing_features(resolve_target(target)):
            return target
    pytest.fail("this CPU has every extension tried: add a newer one")


@pytest.mark.skipif(host_arch() != "x86_64", reason="x86 instruction set extensions")
def test_an_x86_target_with_an_extension_this_cpu_lacks_does_not_run_here():
    target = _x86_target_this_cpu_cannot_run()
    missing = missing_features(resolve_target(target))
    assert not runs_here(resolve_target(target)) and runs_here(resolve_target("host"))
    with pytest.raises(RuntimeError, match=f"without {missing[0]}.*tvmlayers compile"):
        tl.ReLU(target=target)(torch.randn(4))
