"""Kernels run on torch's own OpenMP thread pool instead of TVM's.

Why: torch (CPU wheel, GNU OpenMP) and TVM each keep a pool of worker threads that spin for a while
after their work.  In a model that alternates torch ops and tvmlayers kernels on a 2-core machine, each
library's spinning workers steal the cores the other one needs: a TVM 3x3 conv took 4.0 ms right after
a torch BatchNorm against 1.1 ms with torch's workers passive.  One pool for both removes the fight.

How: every exported kernel library holds function pointers that TVM's loader fills when it loads the
library (``__TVMBackendParallelLaunch``, and ``__TVMBackendParallelBarrier`` in kernels that synchronize
inside a parallel region).  After a kernel is loaded, :func:`attach` points them at a tiny launcher
written against OpenMP and linked to the ``libgomp.so.1`` torch already loaded (same soname, so the
dynamic linker hands back torch's copy): a parallel loop of a kernel becomes an ``omp parallel`` region
of torch's pool.  The team is ``omp_get_max_threads()`` of the calling thread, which is what
``torch.set_num_threads`` sets; inside an active parallel region (nested call) OpenMP runs it on one
thread.  The launcher is compiled once per machine with the system C compiler into the kernel cache
(into a private temporary folder, per process, where the cache is read-only or refused).

``TVMLAYERS_THREAD_POOL=tvm`` (or :func:`set_thread_pool`) keeps TVM's own pool; kernels already loaded
are switched too.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Literal

import torch

from .private_dirs import check_private, make_private_dirs

ThreadPool = Literal["torch", "tvm"]

_LAUNCHER_SOURCE = r"""
#include <omp.h>
#include <stdint.h>

typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

/* team size of the calling thread's last launch: lets tests see the thread count kernels really get */
static __thread int last_team = 0;

int tvmlayers_last_team(void) { return last_team; }

/* TVM's contract: num_task == 0 means "every thread of the pool"; each task gets its id and the team
   size in penv, a non-zero return is an error whose message the task has already set. */
int tvmlayers_parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  int team = omp_get_max_threads();
  if (num_task > 0 && num_task < team) team = num_task;
  int status = 0, size = 1;
#pragma omp parallel num_threads(team)
  {
    TVMParallelGroupEnv env = {0, omp_get_num_threads()};
    int rc = flambda(omp_get_thread_num(), &env, cdata);
    if (rc != 0) {
#pragma omp atomic write
      status = rc;
    }
#pragma omp master
    size = env.num_task;
  }
  last_team = size;
  return status;
}

/* an orphaned barrier binds to the launch's parallel region */
int tvmlayers_parallel_barrier(int task_id, TVMParallelGroupEnv* penv) {
  (void)task_id;
  (void)penv;
#pragma omp barrier
  return 0;
}
"""

# kernel-library pointer -> our launcher function
_POINTERS = {
    "__TVMBackendParallelLaunch": "tvmlayers_parallel_launch",
    "__TVMBackendParallelBarrier": "tvmlayers_parallel_barrier",
}

_lock = threading.Lock()
_pool: ThreadPool | None = None
_launcher: ctypes.CDLL | None = None
# every kernel library attached so far: (library, {pointer symbol: TVM's original value})
_libraries: list[tuple[ctypes.CDLL, dict[str, int]]] = []


def _requested_pool() -> ThreadPool:
    value = os.environ.get("TVMLAYERS_THREAD_POOL", "torch")
    if value not in ("torch", "tvm"):
        raise ValueError(f"TVMLAYERS_THREAD_POOL must be 'torch' or 'tvm', got {value!r}")
    return value  # type: ignore[return-value]


def _torch_uses_gnu_openmp() -> bool:
    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def _launcher_dir() -> Path:
    from .cache import default_cache_dir  # noqa: PLC0415 - cache imports this module's users

    return default_cache_dir() / "runtime"


def _build_launcher(directory: Path) -> ctypes.CDLL:
    """Compile (once per source and compiler) into ``directory`` and load the launcher; checks it shares
    torch's libgomp."""
    compiler = os.environ.get("CC", "cc")
    tag = hashlib.sha256((_LAUNCHER_SOURCE + compiler).encode()).hexdigest()[:16]
    make_private_dirs(directory)
    library = directory / f"omp_launcher-{tag}.so"
    if not library.exists():
        source = directory / f".omp_launcher-{tag}-{os.getpid()}.c"
        staged = directory / f".omp_launcher-{tag}-{os.getpid()}.so"
        source.write_text(_LAUNCHER_SOURCE)
        try:
            subprocess.run(
                [compiler, "-O2", "-shared", "-fPIC", "-fopenmp", str(source), "-o", str(staged)],
                check=True,
                capture_output=True,
                text=True,
            )
            os.replace(staged, library)  # atomic: another process never loads half a library
        finally:
            source.unlink(missing_ok=True)
            staged.unlink(missing_ok=True)
    for item in (directory, library):  # loading a library runs its code: only one nobody else could write
        check_private(item)
    launcher = ctypes.CDLL(str(library))
    torch_gomp = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libgomp.so.1"))
    ours = ctypes.cast(launcher.omp_get_max_threads, ctypes.c_void_p).value
    if ours != ctypes.cast(torch_gomp.omp_get_max_threads, ctypes.c_void_p).value:
        raise RuntimeError("the launcher resolved another OpenMP runtime than torch's")
    return launcher


def _ensure_launcher() -> ctypes.CDLL | None:
    """The launcher, or None (TVM's pool) when torch has no GNU OpenMP pool or building it failed."""
    global _launcher
    if _launcher is None:
        if not _torch_uses_gnu_openmp() or not (Path(torch.__file__).parent / "lib" / "libgomp.so.1").exists():
            return None
        try:
            try:
                _launcher = _build_launcher(_launcher_dir())
            except OSError:  # a read-only or untrusted cache: a private folder of this process's own
                with tempfile.TemporaryDirectory(prefix="tvmlayers-runtime-") as private:
                    _launcher = _build_launcher(Path(private))  # stays mapped after its file is gone
        except (OSError, subprocess.CalledProcessError, RuntimeError, AttributeError) as err:
            detail = err.stderr.strip() if isinstance(err, subprocess.CalledProcessError) else str(err)
            warnings.warn(
                f"tvmlayers: kernels keep TVM's own thread pool (could not build the launcher on torch's OpenMP "
                f"pool: {detail}); set TVMLAYERS_THREAD_POOL=tvm to silence this",
                stacklevel=3,
            )
            return None
    return _launcher


def _point(library: ctypes.CDLL, originals: dict[str, int], pool: ThreadPool) -> None:
    launcher = _ensure_launcher() if pool == "torch" else None
    for symbol, original in originals.items():
        pointer = ctypes.c_void_p.in_dll(library, symbol)
        if launcher is None:
            pointer.value = original
        else:
            pointer.value = ctypes.cast(getattr(launcher, _POINTERS[symbol]), ctypes.c_void_p).value


def attach(so_path: str | os.PathLike) -> None:
    """Point a just-loaded kernel library's parallel runtime at the current pool (see module doc)."""
    library = ctypes.CDLL(str(so_path))  # the handle TVM's loader already holds: same library, same memory
    originals = {}
    for symbol in _POINTERS:
        try:
            originals[symbol] = ctypes.c_void_p.in_dll(library, symbol).value
        except ValueError:  # a single-threaded kernel has no parallel runtime at all
            continue
    if not originals:
        return
    with _lock:
        _point(library, originals, get_thread_pool())
        _libraries.append((library, originals))


def get_thread_pool() -> ThreadPool:
    """Which pool runs kernels' parallel loops: ``"torch"`` (default) or ``"tvm"``."""
    global _pool
    if _pool is None:
        _pool = _requested_pool()
        if _pool == "torch" and _ensure_launcher() is None:
            _pool = "tvm"
    return _pool


def set_thread_pool(pool: ThreadPool) -> None:
    """Run kernels on torch's OpenMP pool (``"torch"``) or TVM's own (``"tvm"``), loaded ones included."""
    global _pool
    if pool not in ("torch", "tvm"):
        raise ValueError(f"set_thread_pool expects 'torch' or 'tvm', got {pool!r}")
    if pool == "torch" and _ensure_launcher() is None:
        raise RuntimeError("torch's OpenMP pool is not available here (torch is not built with GNU OpenMP)")
    with _lock:
        _pool = pool
        for library, originals in _libraries:
            _point(library, originals, pool)


def last_team_size() -> int:
    """Threads the calling thread's last kernel launch on torch's pool ran with (0: none yet)."""
    launcher = _ensure_launcher()
    return 0 if launcher is None else int(launcher.tvmlayers_last_team())
