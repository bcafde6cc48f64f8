"""The tuner: MetaSchedule search over the workloads of a file, measured here or on a board over RPC.

It sits on top of everything else (:mod:`tvmlayers.tuning.tuner` and its helpers: devices, export,
interrupt, pools, fast_import, qemu_board) and writes the tuning logs that :mod:`tvmlayers.records` reads;
only the CLI and the lazy names of :mod:`tvmlayers` (``tl.tune``) import it.
"""
