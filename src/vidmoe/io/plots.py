"""matplotlib for the PNG plots training, evaluation and benchmarks write (headless: Agg)."""

from __future__ import annotations


def pyplot():
    """`matplotlib.pyplot` on the Agg backend (no display needed).

    Raises:
        ImportError: naming the package to install, when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'vidmoe[plots]'") from e
    return plt
