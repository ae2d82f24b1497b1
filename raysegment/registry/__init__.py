"""The MLflow registry: registration, the one champion rule (``champion``), the versions
listed and the champion moved by hand (``versions``), the pyfunc models.

May import ``inference`` and below; not ``training`` or ``cli`` (``__main__`` is the command entry).
"""
