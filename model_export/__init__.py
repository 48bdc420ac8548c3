"""fedge model export: a PyTorch module in, a training bundle out (authoring host only).

Owns: tracing the portable train step, ONNX/TFLite/ORT-artifact generation, the manifest
writer, and the demo models. Imports torch; may import ``edge_sdk.bundle`` for the manifest
format. Must not import ``coordinator``. Nothing on a device imports this package.
"""
