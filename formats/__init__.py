"""The qwen3pack on-disk format v1 (SPEC.md): its layout, writer, reader and validation."""
from .dtypes import DTYPES
from .layout import LayoutError, global_tensors, make_layout, rank_tensors
from .rankfile import VERSION, FormatError, RankFileWriter, rank_file_name
from .reader import (MANIFEST, ConvertedModel, RankFile, checksum_problems, gather, open,
                     read_manifest)
from .validate import Report, validate

__all__ = ["open", "gather", "validate", "verify_checksums", "read_manifest", "Report", "ConvertedModel",
           "RankFile", "RankFileWriter", "FormatError", "LayoutError", "make_layout", "rank_tensors",
           "global_tensors", "rank_file_name", "DTYPES", "MANIFEST", "VERSION"]


def verify_checksums(converted):
    """Raises FormatError at the first tensor whose CRC32C does not match."""
    for rank_file in converted.ranks:
        for problem in checksum_problems(rank_file):
            raise FormatError(problem)
