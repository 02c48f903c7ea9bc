"""Batch segmentation of many CTs: one output folder per case, resumable, on a local pool or Dask.

``ctpassport batch IN_DIR OUT_DIR`` -> :func:`ctpassport.batch.runner.run_batch`; the per-case function
is :func:`ctpassport.batch.worker.run_case`.
"""
