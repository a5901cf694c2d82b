"""Benchmark code, kept out of the library's import chain:

- :mod:`.e2e`: ``adaptok-bench`` (also ``python -m adaptok.bench``), a timm
  ViT end to end with adaptok next to what users run without it;
- :mod:`.baselines`: those alternatives, in plain timm and PyTorch;
- :mod:`.timing`: timing, spread and provenance, shared with the ``bench/``
  pytest-benchmark suite.

Importing this package imports none of them (nor timm)."""


def main(argv=None) -> None:
    """``adaptok-bench``'s entry point (:func:`adaptok.bench.e2e.main`)."""
    from .e2e import main as run

    run(argv)
