"""The command lines: thin argparse layers over the stages' functions, shared argument checks
(``args``), benchmarks (``bench``, ``gpu_smoke``) and the ``raysegment`` console script (``main``).

The top layer: may import every stage; nothing imports it.
"""
