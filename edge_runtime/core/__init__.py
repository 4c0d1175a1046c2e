"""Inference core shared by the training host, the field calibration tool and the edge runtime.

Everything here is numpy (plus ONNX Runtime in :mod:`engines`), never torch, so that an edge box with
only onnxruntime or TensorRT can run it and the host and field tools compute exactly the same math.
"""
