"""The online service: a Ray Serve application over a registered model (``app``: the HTTP API and
the replica that follows the registry alias; ``answers``: what ``/v1/segment`` reads and answers;
``settle``: the wait for a stack pushed slice by slice; ``run``: deploying it; ``load``: the load test).

It segments with the same Predictor and per-study code as the scheduled job (``inference.study``,
``inference.pacs``). May import ``inference`` and the stages below it; never ``training`` or ``cli``.
"""
