"""The record store and its lookup: what the build reads to schedule a kernel from tuning.

Tuning logs on disk and the allow-list every record passes (:mod:`.database`, :mod:`.record_check`),
replaying a record (:mod:`.apply`), records that travel to other CPUs of a family or to neighbouring shapes
(:mod:`.family`, :mod:`.neighbours`, :mod:`.trial`, :mod:`.travel`) and this machine's verdicts on them
(:mod:`.verdicts`), and the note of layer calls that ran untuned (:mod:`.untuned`).  It sits below the
build (:mod:`tvmlayers.build`) and never imports it, the layers above it, or the tuner
(:mod:`tvmlayers.tuning`), which writes the records this package reads.  Its file formats are documented in
:mod:`tvmlayers.formats`.
"""
