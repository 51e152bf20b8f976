"""qwen3pack: Qwen3 checkpoints packed per tensor-parallel rank, run by a lean C++ runtime.

    qwen3pack.convert.convert(source, output, tp=2)   # or the qwen3-convert command
    qwen3pack.validate(directory)                     # a Report: .ok, .problems
    qwen3pack.formats.open(directory)                 # manifest and memory-mapped tensors
    qwen3pack.load(directory).logits([1, 2, 3])        # the C++ runtime
"""
__version__ = "0.1.0"

from . import convert, formats, testing  # noqa: E402
from .formats import validate  # noqa: E402
from .runtime import load  # noqa: E402

__all__ = ["convert", "formats", "testing", "validate", "load", "__version__"]
