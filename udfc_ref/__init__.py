"""udfc-ref: a NumPy reference implementation of Unified Data-Free Compression.

Core API::

    import udfc_ref
    model = udfc_ref.load("model.safetensors")
    small, report = udfc_ref.compress(model, prune_ratio=0.3, weight_bits=6, method="udfc")
    udfc_ref.save(small, "model.udfc.safetensors")

Only NumPy and SciPy are imported here (the safetensors container is read and
written by ``io.py`` itself); PyTorch and Keras live in the optional
``converters`` package.
"""

from .errors import ConversionError, FormatError, GraphError, NumericError, OptionError, UDFCError
from .graph import Model, Node
from .compression import compress
from .io import load, save
from .sweep import sweep  # the function; the module is udfc_ref.sweep in sys.modules (importlib.import_module)
from .synthetic import synthesize  # optional: needs PyTorch when called (imported lazily)

__version__ = "0.1.0"

__all__ = [
    "Model", "Node", "load", "save", "compress", "sweep", "synthesize", "UDFCError", "FormatError", "GraphError",
    "NumericError", "OptionError", "ConversionError", "__version__",
]
