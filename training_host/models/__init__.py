"""The networks: the frozen ImageNet trunks and the patch-feature extractor (backbone.onnx), the residual
Swin (swin.onnx), and their ONNX export."""
