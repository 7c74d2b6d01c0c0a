"""Exporting a model for serving: SavedModel, TFLite and ONNX, each checked in its own runtime.

`export` does the work; `formats` is the registry (one module per format: `saved_model`,
`tflite`, `onnx`); `signature` names the served inputs and outputs; `verify` runs the artifact.

(The package is not called `export` because `fusecli.export` is the public function.)
"""
