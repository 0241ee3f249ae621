"""Wire and file formats: safe tensor framing, FLModel and task messages, validation."""

from fedctl.codec.model import (
    NUM_STEPS_KEY,
    TASK_EVALUATE,
    TASK_NAMES,
    TASK_SUBMIT_MODEL,
    TASK_TRAIN,
    FLModel,
    ParamsType,
    Task,
    TaskResult,
)

__all__ = [
    "NUM_STEPS_KEY",
    "TASK_EVALUATE",
    "TASK_NAMES",
    "TASK_SUBMIT_MODEL",
    "TASK_TRAIN",
    "FLModel",
    "ParamsType",
    "Task",
    "TaskResult",
]
