"""Types and the one error class every part of secure aggregation shares."""

from __future__ import annotations

import numpy as np

# An adapter update (or its protected form): tensor name -> array, in the adapter's key order.
Tensors = dict[str, np.ndarray]


class SecAggError(ValueError):
    """Bad input to secure aggregation; the message names the party, tensor or field at fault."""
