"""Trust and state of the kernel cache: a kernel is loaded only from the user's own private folders and only
under the spec it was built for; killed builds and a broken or unwritable untuned list never break a call."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from conftest import HOST
from tvmlayers.build import kernel_for
from tvmlayers.cache import KernelCache
from tvmlayers.formats import canonical_json
from tvmlayers.private_dirs import UntrustedPathError
from tvmlayers.records.database import RECORD_FILE, WORKLOAD_FILE, TuningLog, merge_logs
from tvmlayers.spec import KernelSpec
from tvmlayers.targets import target_json, target_key

SIZE = 4096
SPEC = KernelSpec.make("relu", (SIZE,), "float32", HOST)
OTHER = 65534  # nobody: "another user" (the tests run as root, which may chown)
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")


@pytest.fixture(autouse=True)
def _default_schedules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TVMLAYERS_TUNED", "0")  # the probe's key must be the key every test's call asks for


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """SPEC built once in a cache of its own: (its key, its entry folder), to copy or forge entries from."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TVMLAYERS_TUNED", "0")
        kernel = kernel_for(SPEC, cache_dir=tmp_path_factory.mktemp("probe"))
    return kernel.key, kernel.path.parent


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The cache of this test, as ``TVMLAYERS_CACHE_DIR`` names it (not created)."""
    monkeypatch.setenv("TVMLAYERS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def planted_so(tmp_path: Path) -> tuple[bytes, Path]:
    """A library whose constructor creates a marker file when it is loaded: (its bytes, the marker)."""
    marker = tmp_path / "constructor-ran"
    source = tmp_path / "planted.c"
    source.write_text(
        "#include <fcntl.h>\n#include <unistd.h>\n"
        "__attribute__((constructor)) static void planted(void) {\n"
        f'    int fd = open("{marker}", O_CREAT | O_WRONLY, 0644);\n'
        "    if (fd >= 0) close(fd);\n}\n"
    )
    library = tmp_path / "planted.so"
    compiler = shutil.which("cc") or shutil.which("gcc") or "g++"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    # the marker is a faithful witness: loading the library does create it
    subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(library)!r})"], check=True)
    assert marker.exists()
    marker.unlink()
    return library.read_bytes(), marker


def _plant(cache: Path, key: str, library: bytes, manifest: dict) -> Path:
    """An entry for ``key`` whose manifest vouches for ``library`` (right size and SHA-256)."""
    entry = KernelCache(cache).entry_dir(key)
    entry.mkdir(parents=True)
    (entry / "kernel.so").write_bytes(library)
    manifest = {**manifest, "key": key, "so_size": len(library), "so_sha256": hashlib.sha256(library).hexdigest()}
    (entry / "manifest.json").write_text(json.dumps(manifest))
    return entry


def _copy(probe: tuple[str, Path], cache: Path) -> Path:
    """The probe's entry copied into ``cache`` (a fully built cache without compiling)."""
    key, source = probe
    entry = KernelCache(cache).entry_dir(key)
    shutil.copytree(source, entry)
    return entry


def _manifest(entry: Path) -> dict:
    return json.loads((entry / "manifest.json").read_text())


def _call(spec: KernelSpec = SPEC) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel of ``spec`` (a relu) run on a random input: (its output, torch's)."""
    kernel = kernel_for(spec)
    x = torch.randn(spec.input_shape)
    out = torch.empty_like(x)
    kernel(x, out)
    return out, torch.relu(x)


def _chown(path: Path) -> None:
    for folder, _, files in os.walk(path):
        os.chown(folder, OTHER, OTHER)
        for name in files:
            os.chown(Path(folder) / name, OTHER, OTHER)


def _move_and_link(path: Path) -> None:
    elsewhere = path.parent.parent / f"elsewhere-{path.name}"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)


# how the planted entry was made untrusted -> what the refusal says
UNTRUSTED: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "world-writable-root": (lambda root, entry: root.chmod(0o777), r"writable by group or others \(mode 0777\)"),
    "group-writable-shard": (lambda root, entry: entry.parent.chmod(0o775), r"mode 0775.*chmod 700"),
    "world-writable-manifest": (lambda root, entry: (entry / "manifest.json").chmod(0o666), r"chmod go-w"),
    "foreign-root": (lambda root, entry: _chown(root), rf"owned by uid {OTHER}, not by you"),
    "foreign-entry": (lambda root, entry: _chown(entry), rf"owned by uid {OTHER}"),
    "foreign-library": (lambda root, entry: os.chown(entry / "kernel.so", OTHER, OTHER), rf"owned by uid {OTHER}"),
    "linked-library": (lambda root, entry: _move_and_link(entry / "kernel.so"), "symbolic link"),
    "linked-entry": (lambda root, entry: _move_and_link(entry), "symbolic link"),
}


@pytest.mark.parametrize("how", [pytest.param(name, marks=as_root if "foreign" in name else ()) for name in UNTRUSTED])
def test_planted_kernel_is_refused(how: str, probe, cache: Path, planted_so) -> None:
    library, marker = planted_so
    key, source = probe
    cache.mkdir()
    entry = _plant(cache, key, library, _manifest(source))
    expect = {"spec": SPEC.to_json(), "layout": _manifest(source)["layout"]}
    assert KernelCache(cache).load(key, expect) is not None, "the planted entry is self-consistent"
    make_untrusted, says = UNTRUSTED[how]
    make_untrusted(cache, entry)
    with pytest.raises(UntrustedPathError, match=says) as refused:
        kernel_for(SPEC)
    assert isinstance(refused.value, PermissionError)
    message = str(refused.value)
    assert "refusing to load kernels" in message and "runs code" in message and "TVMLAYERS_CACHE_DIR" in message
    with pytest.raises(UntrustedPathError):
        KernelCache(cache).entries()  # `tvmlayers cache ls` reads nothing from there either
    assert not marker.exists(), "the planted library was loaded"


def test_new_folders_are_private_existing_ones_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    mine.chmod(0o755)
    root = mine / "deeper" / "cache"
    monkeypatch.setenv("TVMLAYERS_CACHE_DIR", str(root))
    out, expected = _call(KernelSpec.make("relu", (SIZE + 8,), "float32", HOST))
    assert torch.equal(out, expected)
    (entry,) = KernelCache(root).entries()
    created = [mine / "deeper", root, root / "kernels", entry.directory.parent.parent, entry.directory.parent]
    created += [entry.directory, root / "locks", root / "untuned"]
    assert {str(p): oct(p.stat().st_mode & 0o777) for p in created} == {str(p): "0o700" for p in created}
    assert oct(mine.stat().st_mode & 0o777) == "0o755", "an existing folder keeps its mode"
    assert {oct(p.stat().st_mode & 0o777) for p in entry.directory.iterdir()} == {"0o600"}

    # tuning logs: a tuner's target folder (made by its lock), and a merge's destination
    log = TuningLog.for_target(tmp_path / "logs" / "root", HOST)
    log.add_workloads({}, HOST)
    (log.directory / WORKLOAD_FILE).write_text(json.dumps(["123", {}]) + "\n")
    (log.directory / RECORD_FILE).write_text(json.dumps([0, [[], [0.001], target_json(HOST), []]]) + "\n")
    merged = tmp_path / "merged" / "logs"
    assert log.key in merge_logs([log.directory.parent], merged)  # the record itself does not matter here
    for folder in (tmp_path / "logs", log.directory.parent, log.directory, merged.parent, merged, merged / log.key):
        assert oct(folder.stat().st_mode & 0o777) == "0o700", folder


@pytest.mark.parametrize(
    "damage",
    [
        lambda m: m["spec"].update(input_shape=[SIZE // 2]),  # another spec's kernel under this key
        lambda m: m["spec"].update(target={"kind": "c"}),
        lambda m: m.update(layout={"weight_block": 16}),
        lambda m: m.pop("layout"),
        lambda m: m.pop("output_shapes"),
        lambda m: m.pop("symbol"),
        lambda m: m.update(provenance="default"),
        lambda m: m.update(output_shapes=[["4096"]]),
    ],
    ids=[
        "other-shape",
        "other-target",
        "other-layout",
        "no-layout",
        "no-output-shapes",
        "no-symbol",
        "provenance-not-a-table",
        "shape-not-ints",
    ],
)
def test_manifest_not_matching_the_request_is_rebuilt(damage, probe, cache: Path) -> None:
    entry = _copy(probe, cache)
    manifest = _manifest(entry)
    damage(manifest)
    (entry / "manifest.json").write_text(json.dumps(manifest))
    kernel = kernel_for(SPEC)
    assert kernel.built_here, "an entry made for anything else than the request must be rebuilt, not loaded"
    assert canonical_json(_manifest(entry)["spec"]) == canonical_json(SPEC.to_json())
    x = torch.randn(SIZE)
    out = torch.empty(SIZE)
    kernel(x, out)
    assert torch.equal(out, torch.relu(x))


def test_killed_builds_leave_nothing_behind(probe, cache: Path) -> None:
    key, _ = probe
    shard = KernelCache(cache).entry_dir(key).parent
    staging = shard / f".tmp-{key}-999999-{'0' * 32}"
    trash = shard / f".trash-{key}-{'1' * 32}"
    another = shard / f".tmp-{key[:2]}{'f' * 62}-1-{'2' * 32}"  # another key's: its builder may be alive
    for folder in (staging, trash, another):
        folder.mkdir(parents=True)
        (folder / "kernel.so").write_bytes(b"half a library")
    out, expected = _call()
    assert torch.equal(out, expected)
    assert not staging.exists() and not trash.exists()
    assert another.exists()


@pytest.mark.parametrize(
    "content",
    ["this is [not toml", "format = 2\n", "format = 1\nlayer = 5\n", 'format = 1\n[[layer]]\nop = "conv3d"\n'],
    ids=["not-toml", "other-format", "layer-not-a-table", "bad-layer"],
)
def test_corrupt_untuned_list_never_fails_a_call(content: str, probe, cache: Path) -> None:
    _copy(probe, cache)
    listed = cache / "untuned" / f"{target_key(HOST)}.toml"
    listed.parent.mkdir()
    listed.write_text(content)
    with pytest.warns(UserWarning, match="could not add .* left as it is"):
        out, expected = _call()
    assert torch.equal(out, expected)
    assert listed.read_text() == content, "the user's file is not overwritten"


def test_unwritable_untuned_list_never_fails_a_call(probe, cache: Path) -> None:
    _copy(probe, cache)
    (cache / "untuned").write_text("a file where the folder should be")
    with pytest.warns(UserWarning, match="could not add"):
        out, expected = _call()
    assert torch.equal(out, expected)


_READ_ONLY_CHILD = textwrap.dedent(
    f"""
    import json, torch
    from tvmlayers.build import kernel_for
    from tvmlayers.spec import KernelSpec
    from tvmlayers.targets import resolve_target
    kernel = kernel_for(KernelSpec.make("relu", ({SIZE},), "float32", resolve_target("host")))
    x = torch.randn({SIZE})
    out = torch.empty({SIZE})
    kernel(x, out)
    print(json.dumps({{"equal": torch.equal(out, torch.relu(x)), "built_here": kernel.built_here}}))
    """
)


@pytest.fixture
def read_only_mount() -> Iterator[None]:
    """Skips unless this process may bind-mount read-only in a private mount namespace (root in CI may)."""
    here = str(Path(__file__).parent)
    probe = subprocess.run(["unshare", "-m", "mount", "--bind", "-o", "ro", here, here], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no read-only bind mounts here: {probe.stderr.decode().strip()}")
    yield


def test_read_only_prebuilt_cache_works(read_only_mount, probe, cache: Path) -> None:
    _copy(probe, cache)  # fully built, but never run here: the untuned list does not exist yet
    script = f'mount --bind -o ro "{cache}" "{cache}" && exec "{sys.executable}" -c "$CHILD"'
    env = {**os.environ, "CHILD": _READ_ONLY_CHILD}
    child = subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout.splitlines()[-1]) == {"equal": True, "built_here": False}
    assert "could not add" in child.stderr and "Read-only file system" in child.stderr
    assert not (cache / "untuned").exists()
