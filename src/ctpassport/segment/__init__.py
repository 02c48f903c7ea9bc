"""CT segmentation with TotalSegmentator's fast model: preprocessing, sliding window, backends, postprocessing.

The stages are separate functions (load, preprocess, infer, postprocess, write) so that the benchmark can
time each; :class:`~ctpassport.segment.pipeline.Segmenter` ties them together and keeps one inference
session for all calls.
"""
