"""Legacy import path ``raysegment.predict`` (registered models' pyfunc code imports it); the
Predictor lives in ``raysegment.inference.predictor``. Nothing else may import this module."""

from raysegment.inference.predictor import Predictor  # noqa: F401
