"""Making models: the training core (``core``), the Ray Train loop (``train``), the local loop
(``local``), the search and its final stage (``tune``), cross-validated masks (``crossval``).

May import every stage but ``cli``.
"""
