"""The small pretrained example bundled with udfc-ref (used by ``udfc demo``).

A VGG-style BN CNN trained on scikit-learn's 8x8 handwritten digits, plus its
held-out test split; see ``udfc_ref/data/README.md`` for how both were made.
NumPy only: neither scikit-learn nor PyTorch is needed to use them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import FormatError
from .graph import Model

_DATA = Path(__file__).resolve().parent / "data"

#: top-1 accuracy of the bundled model on the bundled test split (538 / 540)
EXAMPLE_TEST_ACCURACY = 538 / 540


def example_model_path() -> str:
    """Path of the bundled digits CNN (``digits_cnn.safetensors``)."""
    return str(_DATA / "digits_cnn.safetensors")


def example_data_path() -> str:
    """Path of the bundled held-out digits split (``digits_test.npz``)."""
    return str(_DATA / "digits_test.npz")


def load_example() -> Model:
    """Load the bundled digits CNN.

    Returns
    -------
    Model
        Input (1, 8, 8), output logits (10,).
    """
    from .io import load

    return load(example_model_path())


def load_example_data() -> tuple[np.ndarray, np.ndarray]:
    """Load the bundled held-out split, normalised as the model expects.

    Returns
    -------
    x : np.ndarray, float32, shape (N, 1, 8, 8)
        ``(pixels / 16 - 0.5) / 0.5``.
    y : np.ndarray, int64, shape (N,)
        Digit labels 0..9.
    """
    path = example_data_path()
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
    except (OSError, KeyError, ValueError) as e:
        raise FormatError(f"bundled example data {path!r} is missing or unreadable: {e}") from None
    return x, y
