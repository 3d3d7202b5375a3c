"""Moved to ``jaxserve.engine.pipeline``; this re-export goes once engine.py / kv_transfer.py import from there."""
from jaxserve.engine.pipeline import *  # noqa: F403
from jaxserve.engine.pipeline import PipelineExecutor, split_layers, split_microbatches, stage_params  # noqa: F401
