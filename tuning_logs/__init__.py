"""Tuning logs shipped with tvmlayers (data only): one MetaSchedule database per target key.
Their layout is documented in tvmlayers/formats.py."""
