"""The element types of format v1 and conversions between them, on numpy arrays.

Inside the converter bf16 data travels as its raw uint16 bits; values handed to users are
ml_dtypes.bfloat16 arrays (numpy's bfloat16, as JAX and TensorFlow use it).
"""
import ml_dtypes
import numpy as np

# name -> (element size in bytes, numpy dtype that holds the raw elements)
DTYPES = {
    "bf16": (2, np.dtype("<u2")),
    "f16": (2, np.dtype("<f2")),
    "f32": (4, np.dtype("<f4")),
}

# safetensors' spelling of the same types
SAFETENSORS_DTYPES = {"BF16": "bf16", "F16": "f16", "F32": "f32"}

F16_MAX = float(np.finfo(np.float16).max)


def element_size(dtype):
    return DTYPES[dtype][0]


def storage_dtype(dtype):
    return DTYPES[dtype][1]


def values_dtype(dtype):
    """The numpy dtype of the values: bf16 as ml_dtypes.bfloat16 (same bytes as the storage)."""
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bf16" else storage_dtype(dtype)


def to_float32(raw, dtype):
    """Values of `raw` (elements stored as `dtype`) as float32."""
    if dtype == "bf16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def float32_to_bf16_bits(values):
    """Round float32 to bfloat16 (nearest, ties to even, as torch does); returns uint16 bits."""
    return np.asarray(values, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


class DtypeOverflow(ValueError):
    pass


def convert(raw, src, dst):
    """Elements of dtype `src` as elements of dtype `dst`; raises DtypeOverflow when finite
    values do not fit into f16."""
    if src == dst:
        return raw
    values = to_float32(raw, src)
    if dst == "f32":
        return values
    if dst == "bf16":
        return float32_to_bf16_bits(values)
    with np.errstate(over="ignore"):
        out = values.astype(np.float16)
    overflow = np.isinf(out) & np.isfinite(values)
    if overflow.any():
        worst = float(np.max(np.abs(values[overflow])))
        raise DtypeOverflow(f"value {worst:g} exceeds the f16 range (±{F16_MAX:g})")
    return out
