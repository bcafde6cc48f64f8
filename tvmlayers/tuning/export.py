"""A built kernel exported as a shared library linked on this host for its target's CPU.

MetaSchedule's default export writes an object-file archive that the device links when it loads it: a
remote device without a C compiler (or the qemu stand-in, whose TVM would call this host's x86 linker)
cannot.  So candidates for a remote device are linked here with the target's toolchain (the cross gcc for
an ARM board); the device only loads them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import tvm
from tvm.support.cc import cross_compiler

from ..targets import runs_here, toolchain


def linker(target: tvm.target.Target) -> str | None:
    """The C compiler that links ``target``'s kernels, or None for TVM's default (this machine's g++),
    which is right for a target of this machine's architecture; a missing cross compiler raises."""
    if runs_here(target):
        return None
    return toolchain(target).require(f"linking kernels for {target.attrs.get('mtriple', target.kind.name)}")


def export_linked(module: tvm.runtime.Module | tvm.runtime.Executable, path: str | Path, compiler: str | None) -> None:
    """Write ``module`` to ``path`` as a shared library linked by ``compiler`` (None: TVM's default)."""
    fcompile = cross_compiler(compiler) if compiler else None
    module.export_library(str(path), fcompile=fcompile)


def export_candidate(module: tvm.runtime.Module, compiler: str | None, directory: str) -> str:
    """MetaSchedule builder's ``f_export`` (runs in the builder's worker processes): each candidate in a
    fresh folder under ``directory`` (the tuner's work folder, removed when tuning ends)."""
    path = Path(tempfile.mkdtemp(dir=directory)) / "candidate.so"
    export_linked(module, path, compiler)
    return str(path)
