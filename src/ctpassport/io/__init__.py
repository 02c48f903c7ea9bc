"""Image input/output: NIfTI (gzip through ISA-L), DICOM, orientation helpers, atomic writes."""
