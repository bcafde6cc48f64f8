"""Make MetaSchedule's builders usable on these machines.

Every LocalBuilder worker (a fresh process per batch) and every TuneContext runs
``import tvm.s_tir.tensor_intrin``, which parses hundreds of TVMScript functions; each parse calls
``inspect.stack()``, which resolves the source file of every frame through ``inspect.getmodule`` and so
walks all of ``sys.modules`` per frame.  That import takes 30 to 140 s here, longer than the builder's
timeout, and tuning then silently measures nothing.  The parser only needs the frames themselves, so
during that import ``inspect.stack`` is replaced by a walk over ``sys._getframe`` (about 4 s in all).
"""

from __future__ import annotations

import inspect
import sys


def _frames_only_stack(context: int = 1) -> list[inspect.FrameInfo]:
    frame = sys._getframe(1)
    infos = []
    while frame is not None:
        code = frame.f_code
        infos.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None))
        frame = frame.f_back
    return infos


def import_tensor_intrin() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` quickly; also the LocalBuilder worker initializer."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original = inspect.stack
    inspect.stack = _frames_only_stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original
