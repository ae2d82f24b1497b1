"""Rendering: tables, overlays, learning curves, the batch job's ``report.md``, Bland-Altman plots.

May import ``analysis`` and below; not ``inference`` or above.
"""
