"""Reading and writing studies: NIfTI (``studies``), DICOM (``dicom``; stacks stored as a series per
slice, ``stacks``), DICOM SEG (``seg``), the indices' DICOM SR (``sr``), a PACS over DICOMweb
(``dicomweb``), local or ``s3://`` storage (``storage``), and the writers' atomic files (``files``).

May import ``raysegment.config`` only; no other stage.
"""
