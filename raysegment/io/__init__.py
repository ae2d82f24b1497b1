"""Reading and writing studies: NIfTI (``studies``), DICOM and DICOM SEG (``dicom``), a PACS over
DICOMweb (``dicomweb``), local or ``s3://`` storage (``storage``).

May import ``raysegment.config`` only; no other stage.
"""
