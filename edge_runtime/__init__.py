"""Edge inspection runtime: torch-free inference core, acquisition, publishing and service.

Sub-packages by job:

* ``edge_runtime.core``   - bundle format, PosFAR math (coreset, PCA, retrieval, matching, residuals),
  scoring, inference engines and the per-frame pipeline.  Numpy + ONNX Runtime only.
* ``edge_runtime.cli``    - the ``weakrest-edge`` command (inspect, check-bundle, bench).
"""

__version__ = "0.1.0"
