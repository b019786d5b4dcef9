"""Serving: the scheduler the gateway and the simulator share (torch-free, clock-free).

``Scheduler`` decides; ``Step`` says what one micro-batch step runs; ``pipeline_configs``
derives each pipeline's schedule from a plan. docs/executor.md, "The scheduler".
"""
from __future__ import annotations

from .scheduler import POLICIES, NoPipeline, Scheduler
from .setup import PipelineConfig, has_workload, pipeline_configs
from .step import DONE_OK, Step, StepResult

__all__ = ["DONE_OK", "NoPipeline", "POLICIES", "PipelineConfig", "Scheduler", "Step", "StepResult",
           "has_workload", "pipeline_configs"]
