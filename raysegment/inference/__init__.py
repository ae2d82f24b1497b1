"""Applying models: the ``Predictor`` (``predictor``), scoring on shards (``evaluation``), the
scheduled batch job (``batch``, ``study``, ``ledger``, ``actors``), a pushed PACS series (``pacs``)
and each cine series' indices SR (``clinical_sr``).

May import ``reporting`` and below; never ``training``.
"""
