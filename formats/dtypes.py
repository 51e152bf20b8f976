"""The element types of format v1 and conversions between them, on numpy arrays.

Inside the converter bf16 data travels as its raw uint16 bits; values handed to users are
ml_dtypes.bfloat16 arrays (numpy's bfloat16, as JAX and TensorFlow use it).

q8 is a block type (SPEC.md, "Quantized weights"): each row of a matrix is cut into blocks of 32
values along the input dimension, the last one padded with zeros, and each block is stored as an
f16 scale d and 32 int8 values q, the value being q * d (the layout of llama.cpp's block_q8_0).
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

QUANTIZED = ("q8",)
Q8_BLOCK = 32  # values per block
Q8_BLOCK_DTYPE = np.dtype([("d", "<f2"), ("q", "i1", (Q8_BLOCK,))])  # 34 bytes, no padding
Q8_MAX_SCALE = F16_MAX  # the largest block scale: blocks up to |x| = 127 * 65504 quantize


def element_size(dtype):
    return DTYPES[dtype][0]


def row_bytes(dtype, columns):
    """Bytes of one stored row of `columns` values (q8: whole blocks, the last one padded)."""
    if dtype == "q8":
        return -(-columns // Q8_BLOCK) * Q8_BLOCK_DTYPE.itemsize
    return columns * element_size(dtype)


def tensor_bytes(dtype, shape):
    """Bytes of a stored tensor of `shape` (1 or 2 axes; a vector is one row)."""
    rows = shape[0] if len(shape) == 2 else 1
    return rows * row_bytes(dtype, shape[-1])


def storage_dtype(dtype):
    return DTYPES[dtype][1]


def values_dtype(dtype):
    """The numpy dtype of the values: bf16 as ml_dtypes.bfloat16 (same bytes as the storage),
    q8 dequantized to float32."""
    if dtype == "q8":
        return np.dtype(np.float32)
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


def quantize_q8(values):
    """Rows of float32 `values` [rows, columns] as q8 blocks [rows, ceil(columns / 32)].

    d = max|x| / 127 rounded to f16, q = x * (1 / d) rounded to the nearest integer (ties to
    even), clipped to [-127, 127]: the C++ activation quantizer's rounding, with the stored
    (f16) scale. A block of zeros gets d = 0 and q = 0. Raises DtypeOverflow when a block's
    scale exceeds the f16 range."""
    values = np.asarray(values, dtype=np.float32)
    rows, columns = values.shape
    blocks = -(-columns // Q8_BLOCK)
    padded = values
    if columns % Q8_BLOCK:
        padded = np.zeros((rows, blocks * Q8_BLOCK), dtype=np.float32)
        padded[:, :columns] = values
    padded = padded.reshape(rows, blocks, Q8_BLOCK)
    scale = _block_absmax(padded) / np.float32(127)
    if scale.size and scale.max() > Q8_MAX_SCALE:
        worst = float(np.abs(values).max())
        raise DtypeOverflow(f"value {worst:g} exceeds the q8 range (±{127 * Q8_MAX_SCALE:g})")
    d = scale.astype(np.float16)
    d32 = d.astype(np.float32)
    inverse = np.divide(np.float32(1), d32, out=np.zeros_like(d32), where=d32 != 0)
    q = padded * inverse[..., None]
    # rounds to the nearest integer, ties to even, as np.rint but 4 times faster: |q| <= 128 here,
    # so q + 1.5 * 2^23 has no fraction bits left and the sum's rounding is the rounding of q
    q += _ROUNDING_MAGIC
    q -= _ROUNDING_MAGIC
    np.clip(q, -127, 127, out=q)
    out = np.empty((rows, blocks), dtype=Q8_BLOCK_DTYPE)
    out["d"], out["q"] = d, q
    return out


_ROUNDING_MAGIC = np.float32(1.5 * 2**23)


def _block_absmax(blocks):
    """max |x| over the last axis (32 values), by halving: numpy reduces a short last axis slowly."""
    m = np.abs(blocks)
    while m.shape[-1] > 1:
        half = m.shape[-1] // 2
        m = np.maximum(m[..., :half], m[..., half:])
    return m[..., 0]


def dequantize_q8(blocks, columns):
    """float32 values [rows, columns] of q8 `blocks` [rows, blocks per row] (q * d, exact in f32)."""
    blocks = np.asarray(blocks).view(Q8_BLOCK_DTYPE)
    values = blocks["q"].astype(np.float32) * blocks["d"].astype(np.float32)[..., None]
    return values.reshape(len(blocks), -1)[:, :columns]
