"""ctpassport: TotalSegmentator-exact fast CT segmentation, anatomical passports, passport registration.

Importing this package is cheap: heavy libraries (onnxruntime, torch, openvino, streamlit, plotly)
are imported inside the functions that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
