"""The soak (``python -m raysegment.bench soak``): a month of studies in one afternoon — a mixed
corpus with bad inputs (``corpus``; DICOM cine writing in ``dicom_cine``), the scheduled batch job
run again and again under SIGKILLs of actors and drivers (``runner``), the checks (``checks``) and
the whole run (``run``).

Runs the batch job as cron does (a subprocess) and may import ``inference``, ``service`` and the
stages below; never ``training`` or ``cli``.
"""
