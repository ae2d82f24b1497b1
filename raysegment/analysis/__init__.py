"""Numbers from masks: Dice / HD95 (``metrics``), post-processing (``postprocess``), clinical
indices and the basal ES check (``clinical``), the ACDC diagnosis classifier (``diagnosis``).

May import ``data``, ``model``, ``io``, ``config``; not ``reporting``, ``inference``, ``training``.
"""
