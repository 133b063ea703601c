"""JAX settings for tests that compile training steps: a persistent cache, fewer optimisations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache


@contextmanager
def fast_compiles(cache_dir: Path) -> Iterator[None]:
    """
    JAX's persistent compilation cache in ``cache_dir`` (steps of separate `fit` calls
    load instead of compiling again) and most XLA optimisations off (compiling takes
    half as long, and tiny test models run as fast). Restored afterwards.
    """
    settings = {
        "jax_compilation_cache_dir": str(cache_dir),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
        "jax_disable_most_optimizations": True,
    }
    saved = {name: jax.config.values[name] for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
