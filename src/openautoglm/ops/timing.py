"""What every benchmark's timed section needs."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def settled_heap() -> Iterator[None]:
    """Time a run without the cyclic GC scanning what was built before it (a model, a tokenizer, imported
    libraries): a full collection over a few hundred thousand objects pauses the process for a tenth of a second,
    a sizeable share of a short run, and the same start-up heap is frozen in the server."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
