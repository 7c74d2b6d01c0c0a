"""Model file formats: reading `.keras` and `.h5` without TensorFlow, the weight layouts of both,
Keras 2 era conversion, and writing archives."""
