"""Every versioned on-disk format and cache key of tvmlayers, documented in one place.

Kernel cache (``TVMLAYERS_CACHE_DIR``, default ``$XDG_CACHE_HOME/tvmlayers`` or ``~/.cache/tvmlayers``)::

    <cache>/kernels/v<KERNEL_CACHE_VERSION>/<key[:2]>/<key>/
        kernel.so        the compiled kernel, exported by ``Executable.export_library``
        manifest.json    written last; an entry without a valid manifest is incomplete

``<key>`` is :func:`kernel_key`: the SHA-256 of the canonical JSON (sorted keys, no spaces) of::

    {"format": KERNEL_KEY_VERSION, "tvm": <tvm version>, "spec": KernelSpec.to_json(),
     "layout": <weight layout chosen for the target>, "schedule": <schedule identity>}

so a new TVM, a new layout policy or a new schedule source (e.g. a tuning record) never reuses an
old binary.  ``manifest.json`` holds::

    {"format": KERNEL_CACHE_VERSION, "key": ..., "spec": {...}, "layout": {...},
     "provenance": {"source": "default", "rule": "<rule name>"},
     "symbol": <function name inside kernel.so>, "tvm_version": ..., "created": <unix time>,
     "so_sha256": <hex digest of kernel.so>, "so_size": <bytes>}

A CUDA kernel's ``kernel.so`` holds its host code and a fatbin compiled here by nvcc (:mod:`tvmlayers.nvcc`), in
place of the CUDA source TVM would leave; its key's ``"schedule"`` also has ``"device_code": <nvcc's command
line, architecture included>`` and its manifest also ``"cuda_arch": "sm_90"`` and ``"device_code": {"format":
"fatbin", "nvcc": <that command line>, "sha256": <of the fatbin>, "size": <bytes>}``.  Entries are made only
where the kernel can run (a GPU of that architecture: :func:`tvmlayers.targets.runs_here`).

An entry whose manifest is missing, unparsable, of another format, lacks a field above (``created`` and
``tvm_version`` excepted) or has it with another type, holds another ``key``, ``spec`` or ``layout`` than
the call asked for, or whose ``kernel.so`` does not match ``so_size``/``so_sha256`` is treated as
corrupt: it is removed and rebuilt, never loaded.  ``<shard>/.tmp-<key>-<pid>-<hex>/`` is a build in
progress (renamed to ``<key>/`` when done) and ``.trash-<key>-<hex>/`` an entry being removed; those a
killed process left are removed by the next build of ``<key>`` (under the key's lock) and by
``tvmlayers cache clear``.  ``<cache>/locks/<key>.lock`` are the builders' lock files and
``<cache>/untuned/<target key>.toml`` the layers run without a tuning record (a workload file).

Permissions (:mod:`tvmlayers.private_dirs`): the folders tvmlayers creates, here and for the tuning logs,
are mode 0700 and the entry files 0600.  A kernel is loaded only if the cache root (followed when it is
a symbolic link), ``kernels/``, ``v<N>/``, the shard, the entry folder, ``kernel.so`` and
``manifest.json`` are each owned by the user (or root), not writable by group or others, and, below the
root, not symbolic links; otherwise the call raises ``UntrustedPathError`` (a ``PermissionError``)
saying which path, what is wrong and how to fix it.  The folders above the cache root are not checked.

Tuning logs (``TUNING_LOG_VERSION``), one MetaSchedule JSON database per target::

    <log root>/<target key>/              target key: tvmlayers.targets.target_key
        database_workload.json            MetaSchedule's: one line per workload [structural hash, module]
        database_tuning_record.json       MetaSchedule's: one line per measured candidate
                                          [workload line index, [trace, run seconds, target, arg info]]
        tvmlayers.json                    {"format", "tvm_version", "target", "workloads": {hash: spec JSON},
                                           "rejected": {record id: reason}, "baselines": {hash: record id},
                                           "baseline_code": {hash: code fingerprint of that baseline},
                                           "retimed": {hash: {record id: seconds}},
                                           "trials": {hash: count} (kept by merges),
                                           "origins": {record id: where measured, if not by the tuner}}
        offline/<export id>.json          the ledger of an offline-tuning export (below)

A record id is the first 20 hex digits of the SHA-256 of ``canonical_json([workload hash, trace])``; the
kernel key of a tuned kernel has ``"schedule": {"source": "tuned", "record": <id>, "code": ...}``.

A record's trace is code (it is compiled into a library this process loads), so every record read from any
log (shipped, user, merged) must pass the allow-list of :mod:`tvmlayers.records.record_check` (instruction
kinds, annotation keys and value types that our search spaces and MetaSchedule's CPU/CUDA rules produce)
before it is replayed, compiled, merged or handed to MetaSchedule.  A refused record, and any malformed
line (not JSON, nested too deep, over 8 MiB, wrong shape, bad target), is reported once per process with
its file and line, and skipped; a malformed ``tvmlayers.json`` or field reads as empty.

Verdicts on records that travel (``TRAVEL_FORMAT``, :mod:`tvmlayers.records.verdicts`), in the user's log root
only, next to this target's records (``<log root>/<target key>/travel.json``)::

    {"format": TRAVEL_FORMAT, "target": <target key>,
     "verdicts": {<workload hash>: {<candidate>: {
         "candidate": "adopt:<source log's target key>:<record id>" | "neighbour:<same>",
         "adopted": bool, "speedup": <default's time / candidate's, here; 0 if not timed>,
         "reason": <why declined, "" if adopted>, "source_cpu": <e.g. emeraldrapids>,
         "workload": <KernelSpec.describe()>, "neighbour": <the tuned workload re-fitted from, or "">,
         "code": "<code fingerprint>/tvm-<version>" (a verdict of other code is stale: tried again),
         "trace": <a winning neighbour's re-fitted trace, as in a record; allow-listed when read>}}}}

Rewritten whole (temporary file, rename) under the log's ``.lock``; a malformed file or entry is reported
once per process and ignored.

Bundles (``BUNDLE_FORMAT``), written by ``tvmlayers compile`` / :func:`tvmlayers.bundle.compile_bundle` for one
target, checked and timed on the device by their own ``run.py`` (Python, numpy and TVM's runtime only)::

    <bundle>/
        manifest.json                     the JSON below
        run.py                            tvmlayers/bundle_run.py, copied
        tvmlayers_reference.py            tvmlayers/reference.py, copied: torch's reference on the device
        kernels/<name>.so                 one kernel each, linked by the target's (cross) gcc
        kernels/<name>.npz                its reference: input0.. (weights pre-packed), output0.. (torch's, on the host)

    {"format": BUNDLE_FORMAT, "tvmlayers_version", "tvm_version", "created": <unix time>,
     "target": <target JSON>, "target_key": tvmlayers.targets.target_key, "preset": <preset name or null>,
     "arch": "x86_64" | "aarch64" | "arm" (tvmlayers.targets.target_arch; of a CUDA target: its host code),
     "cuda_arch": <"sm_90", the GPU architecture of a CUDA bundle's device code; null for a CPU target>,
     "compiler": <the linking gcc>, "seed": <the seed of the reference inputs>,
     "source": <workload file or model file and input shape>,
     "kernels": [{"name", "layer": <op>, "describe": <one line>, "spec": KernelSpec.to_json(),
                  "inputs": [{"shape", "dtype"}], "outputs": [{"shape", "dtype"}], "weight_layout": {...},
                  "schedule": {"source": "default", "rule"} | {"source": "tuned", "record", ...},
                  "symbol", "library": "kernels/<name>.so", "references": "kernels/<name>.npz" | null,
                  "tolerance": <relative: |got - want| <= tolerance * (1 + max |want|)>,
                  "device_code": <a CUDA kernel's fatbin, as in the kernel cache's manifest>}],
     "files": {<path relative to the bundle>: <sha256 hex>}}   every file but manifest.json

``run.py`` refuses to load anything when a listed file is missing or its SHA-256 differs, and says so when
the machine's architecture is not ``arch`` (or, for a CUDA bundle, torch sees no GPU of ``cuda_arch``).  It loads
the kernels with apache-tvm's runtime when ``import tvm`` works, else with a runtime pack (below).  ``run.py
--json FILE`` writes {"target_key", "cuda_arch", "device", "runtime": {"kind": "apache-tvm" | "runtime-only
pack", "path", "tvm_version"}, "kernels": [{"name", "layer": <describe>, "correct", "problem", "max_err",
"median_us", and on a GPU "torch_us", "ratio": <ours / torch's>}]} (``--json`` alone prints it).
``references`` is null (and there is no ``.npz``) in a bundle
compiled with ``--no-references`` (CUDA bundles for a GPU machine, where torch computes the references; a
model's own weights are then not carried).  ``cuda_arch``, ``seed``, ``device_code`` and a null ``references``
did not bump ``BUNDLE_FORMAT``: a bundle is read by the ``run.py`` it carries.

Runtime packs (``RUNTIME_PACK_FORMAT``), written by ``tvmlayers runtime-pack`` / :mod:`tvmlayers.runtime_pack`: what a
bundle's ``run.py`` needs on a machine without apache-tvm (``PYTHONPATH=<pack> python3 bundle/run.py``)::

    <pack>/
        runtime-pack.json                 the JSON below
        README.txt                        how to use it
        tvm_runtime_libs/libtvm_runtime.so[, libtvm_runtime_cuda.so]   TVM's runtime for ``arch``
        tvm_ffi/, typing_extensions.py, *.dist-info/   the apache-tvm-ffi and typing-extensions wheels for
                                          ``python``, unpacked (without tvm_ffi's C++ headers and sources)

    {"format": RUNTIME_PACK_FORMAT, "arch": "x86_64" | "aarch64", "python": "3.12", "cuda": bool,
     "tvm_version", "tvm_ffi_version", "wheels": [<file names of the unpacked wheels>],
     "libraries": {<path relative to the pack>: <sha256 hex>}}    in the order run.py loads them

``run.py`` refuses a pack of another format, architecture or Python, or whose libraries' SHA-256 differ.
Downloaded wheels are cached in ``$XDG_CACHE_HOME/tvmlayers/wheels/<project>-<version>-<cpXY>-<arch>/`` with a
``sha256.json`` ({"filename", "sha256", "checked_against_pypi"}); a cached wheel whose digest differs is
downloaded again.

Offline tuning (:mod:`tvmlayers.tuning.offline`).  ``tvmlayers tune --export-candidates <folder>`` writes a
bundle (the format above, ``run.py`` included) whose kernels are candidate schedules, plus ``measure.py``
(``tvmlayers/tuning/offline_measure.py``, copied; not in ``files``: it is what runs the checks).  Each kernel
entry has one more field::

    "candidate": {"id": <the record id it becomes>, "export": <export id, 32 hex digits>, "target_key",
                  "workload_hash", "spec": KernelSpec.to_json(), "layout": <weight layout>,
                  "trace": <MetaSchedule trace JSON>, "trace_sha256": <sha256 of its canonical JSON>,
                  "is_default": <the default schedule: the baseline>}

and the same entries (less id, export and target key) are kept on the exporting machine, in the ledger
``<log root>/<target key>/offline/<export id>.json`` (``OFFLINE_EXPORT_FORMAT``)::

    {"format": OFFLINE_EXPORT_FORMAT, "export", "created", "target": <target JSON>, "target_key",
     "tvm_version", "code": <code fingerprint>, "candidates": {<id>: {<the fields above>}}}

``measure.py --out measured.json`` writes (``MEASURED_FORMAT``; rewritten after every candidate; a candidate
whose run killed the process reads as failed, and a second run goes on with those not measured)::

    {"format": MEASURED_FORMAT, "export", "target_key", "device": <GPU name, board or CPU model>,
     "created": <unix time>,
     "kernels": [{"name", "candidate": <the manifest's candidate field, copied>,
                  "status": "ok" | "wrong" (differs from torch) | "failed" (did not load, run or finish),
                  "problem": <what differed or failed, null when ok>, "median_us": <null unless ok>,
                  "max_err": <largest error against torch's outputs>, "torch_us": <torch's time, GPU bundles>}]}

``tvmlayers logs import measured.json`` refuses the whole file when its format, export, target or device
name is malformed, when the export is not in this machine's ledger, or when a candidate was not exported or
its trace, workload hash or default flag differ from the ledger's; the records it writes take the ledger's
traces, never the file's.  Rows ``ok`` with a positive median become records (skipped, and said, when
``ok`` comes without a time), after the allow-list and the workload hash re-derived from the spec by this
tvmlayers; ``wrong`` and ``failed`` rows are counted.

Workload files (``WORKLOAD_FORMAT``): TOML, documented in :mod:`tvmlayers.workloads`.
Benchmark reports (``REPORT_FORMAT``): the JSON of :class:`tvmlayers.benchmark.BenchReport` and of
:class:`tvmlayers.model_bench.ModelReport`.
Environment: ``TVMLAYERS_CACHE_DIR`` (kernel cache), ``TVMLAYERS_TUNING_LOGS`` (user tuning logs),
``TVMLAYERS_TUNED=0`` (ignore tuning logs; ``exact``: this target's records only, ``adopt``: and other CPUs' of
the family, ``neighbours``: and re-fitted neighbours', not other CPUs'; see :mod:`tvmlayers.records.travel`),
``TVM_NUM_THREADS`` (kernel threads).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

KERNEL_KEY_VERSION = 1
KERNEL_CACHE_VERSION = 1
TUNING_LOG_VERSION = 1
WORKLOAD_FORMAT = 1
REPORT_FORMAT = 3  # 2: call overhead fields; 3: model reports time a loop of the model alone and alternating calls
# (and may carry ``program``, a line on the recorded inference program: optional, read as "" where absent, and
# ``layers_after_twin``, the per-layer control rows: optional, read as none where absent)
BUNDLE_FORMAT = 1
RUNTIME_PACK_FORMAT = 1
TRAVEL_FORMAT = 1
OFFLINE_EXPORT_FORMAT = 1
MEASURED_FORMAT = 1


def canonical_json(obj: Any) -> str:
    """The one JSON spelling used for hashing: sorted keys, no whitespace."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def kernel_key(spec_json: dict, layout: dict, schedule: dict, tvm_version: str) -> str:
    payload = {
        "format": KERNEL_KEY_VERSION,
        "tvm": tvm_version,
        "spec": spec_json,
        "layout": layout,
        "schedule": schedule,
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()
