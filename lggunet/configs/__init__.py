"""Experiment configs: each module has `get_config()` returning an ml_collections.ConfigDict."""
