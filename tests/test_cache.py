"""The on-disk kernel cache: reuse across processes, concurrent builders, corrupt and interrupted entries."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import conv_child_report, start_conv_child
from tvmlayers.build import kernel_for
from tvmlayers.cache import KernelCache
from tvmlayers.spec import KernelSpec
from tvmlayers.targets import resolve_target


def _run_child(cache: Path) -> subprocess.Popen:
    return start_conv_child(9, {"TVMLAYERS_CACHE_DIR": str(cache)})


def _relu_spec(size: int = 4096) -> KernelSpec:
    return KernelSpec.make("relu", (size,), "float32", resolve_target("host"))


def _writing(data: bytes, manifest: dict):
    """A build function that writes ``data`` as the library and returns ``manifest``."""

    def build(so: Path) -> dict:
        so.write_bytes(data)
        return dict(manifest)

    return build


def test_second_process_loads_without_compiling(tmp_path: Path) -> None:
    first = conv_child_report(_run_child(tmp_path))
    second = conv_child_report(_run_child(tmp_path))
    assert first["built_here"] is True and second["built_here"] is False
    assert first["key"] == second["key"]
    assert first["error"] < 1e-4 and second["error"] < 1e-4
    assert second["provenance"] == {"source": "default", "rule": "cpu.conv2d_blocked"}


def test_concurrent_builders_compile_once(tmp_path: Path) -> None:
    reports = [conv_child_report(p) for p in [_run_child(tmp_path) for _ in range(3)]]
    assert sorted(r["built_here"] for r in reports) == [False, False, True]
    assert all(r["error"] < 1e-4 for r in reports)
    cache = KernelCache(tmp_path)
    assert len(cache.entries()) == 1
    assert not [p for p in cache.kernels_dir.rglob(".*")], "no staging or trash directories left behind"


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / "kernel.so").write_bytes((d / "kernel.so").read_bytes()[:1000]),  # truncated
        lambda d: (d / "kernel.so").write_bytes(b"\x7fELF" + bytes(2000)),  # replaced by garbage
        lambda d: (d / "manifest.json").write_text("{not json"),
        lambda d: (d / "manifest.json").unlink(),
        lambda d: (d / "kernel.so").unlink(),
    ],
    ids=["truncated-so", "garbage-so", "bad-manifest", "no-manifest", "no-so"],
)
def test_corrupt_entry_is_rebuilt_not_loaded(tmp_path: Path, damage) -> None:
    spec = _relu_spec()
    kernel = kernel_for(spec, cache_dir=tmp_path)
    cache = KernelCache(tmp_path)
    (entry,) = cache.entries()
    original = entry.so_path.read_bytes()
    damage(entry.directory)
    assert cache.load(kernel.key) is None, "a damaged entry must not verify"
    rebuilt, built_here = cache.get_or_build(kernel.key, _writing(original, entry.manifest))
    assert built_here and rebuilt.so_path.read_bytes() == original
    assert len(cache.entries()) == 1


def test_corrupt_entry_is_rebuilt_by_a_new_process(tmp_path: Path) -> None:
    first = conv_child_report(_run_child(tmp_path))
    (entry,) = KernelCache(tmp_path).entries()
    so = entry.so_path
    so.write_bytes(so.read_bytes()[: so.stat().st_size // 2])
    second = conv_child_report(_run_child(tmp_path))
    assert second["built_here"] is True and second["key"] == first["key"] and second["error"] < 1e-4


def test_interrupted_build_leaves_nothing_behind(tmp_path: Path) -> None:
    cache = KernelCache(tmp_path)

    def interrupted(so: Path) -> dict:
        so.write_bytes(b"half a library")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_build("ab" * 32, interrupted)
    assert cache.load("ab" * 32) is None
    assert not list(cache.kernels_dir.rglob("*kernel.so")), "nothing half-written is published"
    entry, built = cache.get_or_build("ab" * 32, _writing(b"library", {"spec": {}}))
    assert built and entry.so_path.read_bytes() == b"library"


def test_kernel_for_uses_the_memo_then_the_disk(tmp_path: Path) -> None:
    spec = _relu_spec(8192)
    kernel = kernel_for(spec, cache_dir=tmp_path)
    assert kernel_for(spec, cache_dir=tmp_path) is kernel
    x = torch.randn(8192)
    out = torch.empty(8192)
    kernel(x, out)
    assert torch.equal(out, torch.relu(x))
    manifest = json.loads((kernel.path.parent / "manifest.json").read_text())
    assert manifest["spec"] == spec.to_json() and manifest["provenance"]["rule"] == "cpu.relu"
    assert KernelSpec.from_json(manifest["spec"]) == spec


def test_clear(tmp_path: Path) -> None:
    kernel_for(_relu_spec(2048), cache_dir=tmp_path)
    cache = KernelCache(tmp_path)
    assert cache.clear() == 1
    assert cache.entries() == []
