"""Offline: recording maps, the projector fit, the build pipeline, templates, calibration,
conversion."""

from .pipeline import BuildConfig, build
from .projector_fit import ProjectorConfig

__all__ = ["BuildConfig", "ProjectorConfig", "build"]
