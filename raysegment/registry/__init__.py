"""The MLflow registry: registration, the one champion rule (``champion``), the pyfunc models.

May import ``inference`` and below; not ``training`` or ``cli`` (``__main__`` is the command entry).
"""
