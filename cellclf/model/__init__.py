"""The classifier: network, training data, augmentation, training, ONNX/int8 export, engines."""
