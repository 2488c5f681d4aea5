"""vidmoe: Mixture-of-Experts video diffusion in the Wan2.2 style.

Importing the package is light: heavy modules load on first use.
"""

__version__ = "0.1.0"


def load_pipeline(path, **kwargs):
    """Load a pipeline from a checkpoint folder, a file, or a preset name; see `vidmoe.loading`."""
    from vidmoe.loading import load_pipeline as _load

    return _load(path, **kwargs)
