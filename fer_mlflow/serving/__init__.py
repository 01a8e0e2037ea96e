"""All a logged model runs where it is served: the pyfunc model, test-time views, temperature,
face detection, the ONNX runtime, drawing predictions. Imports no training code."""
