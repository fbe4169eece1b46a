"""DICOM de-identification (PS3.15 Annex E), pseudonymization and the site's audit trail.

Never imports torch or Flower: de-identification runs beside the PACS on
machines that may have neither.
"""
