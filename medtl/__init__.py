"""medtl: transfer learning for hospital imaging studies.

Studies in (DICOM, NIfTI, PNG/JPEG) -> privacy-aware manifest -> pretrained encoder adapted to the
task -> MLflow run and registry -> per-subgroup audit and report.
"""

__version__ = "0.1.0"
