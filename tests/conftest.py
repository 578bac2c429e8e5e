import os

from hypothesis import settings

# Keras 3 runs on the PyTorch backend in the tests: no TensorFlow needed.
os.environ.setdefault("KERAS_BACKEND", "torch")

# CI runs the property tests on a fixed set of examples (reproducible results);
# local runs keep exploring new random examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
