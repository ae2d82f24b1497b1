"""Legacy import path ``raysegment.checkpoint`` (registered models' pyfunc code imports it); the
code lives in ``raysegment.model.checkpoint``. Nothing else may import this module."""

from raysegment.model.checkpoint import load_checkpoint  # noqa: F401
