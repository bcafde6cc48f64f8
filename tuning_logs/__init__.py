"""Tuning logs shipped with tvmlayers (data only): one MetaSchedule database per target key.
See tvmlayers/records/database.py for the layout."""
