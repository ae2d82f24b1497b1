"""Applying models: the ``Predictor`` (``predictor``), scoring on shards (``evaluation``), the
scheduled batch job (``batch``, ``study``, ``ledger``, ``actors``).

May import ``reporting`` and below; never ``training``.
"""
