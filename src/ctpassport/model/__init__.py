"""nnU-Net model folders (TotalSegmentator layout), class names, stand-in weights and ONNX export."""
