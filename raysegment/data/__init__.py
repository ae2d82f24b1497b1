"""ACDC into Parquet shards (``prepare``, ``volumes``, ``splits``) and out of them for training
(``dataset``: Ray Data, the training grid, batched augmentation).

May import ``io`` and ``config``; not ``model`` or any stage above.
"""
