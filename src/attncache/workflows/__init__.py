"""The commands as Python functions: the CLI, bench, serve and batch are thin layers over these."""

from .calibrate import (
    CalibrationOptions,
    CalibrationResult,
    calibrate,
    templates_only,
)
from .evaluate import BuildOptions, EvalOptions, EvalResult, build, evaluate
from .session import CalibrationData, Session, SessionOptions, input_limit
from .sweep import sweep

__all__ = [
    "BuildOptions",
    "CalibrationData",
    "CalibrationOptions",
    "CalibrationResult",
    "EvalOptions",
    "EvalResult",
    "Session",
    "SessionOptions",
    "build",
    "calibrate",
    "evaluate",
    "input_limit",
    "sweep",
    "templates_only",
]
