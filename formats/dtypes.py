"""The element types of format v1 and conversions between them, on numpy arrays.

Inside the converter bf16 data travels as its raw uint16 bits; values handed to users are
ml_dtypes.bfloat16 arrays (numpy's bfloat16, as JAX and TensorFlow use it).

q8 is a block type (SPEC.md, "Quantized weights"): each row of a matrix is cut into blocks of 32
values along the input dimension, the last one padded with zeros, and each block is stored as an
f16 scale d and 32 int8 values q, the value being q * d (the layout of llama.cpp's block_q8_0).

q4 is a two-level block type, llama.cpp's block_q4_K: blocks of 256 values along the input
dimension, each 8 sub-blocks of 32 with a 6-bit scale and a 6-bit minimum apiece, themselves
scaled by the block's two f16 numbers, and 4-bit values; 4.5 bits a weight. quantize_q4 follows
SPEC.md's rule to the bit (an error-minimising search per sub-block, as llama.cpp's
make_qkx2_quants, with every sum in a fixed order).

q6 is llama.cpp's block_q6_K: blocks of 256 values, 16 sub-blocks of 16 with a signed 8-bit scale
apiece in units of the block's f16 scale, and 6-bit values; 6.5625 bits a weight. quantize_q6
follows SPEC.md's rule to the bit (llama.cpp's make_qx_quants search per sub-block, with fixed sums).
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

QUANTIZED = ("q8", "q4", "q6")
Q8_BLOCK = 32  # values per block
Q8_BLOCK_DTYPE = np.dtype([("d", "<f2"), ("q", "i1", (Q8_BLOCK,))])  # 34 bytes, no padding
Q8_MAX_SCALE = F16_MAX  # the largest block scale: blocks up to |x| = 127 * 65504 quantize


Q4_BLOCK, Q4_SUB = 256, 32  # values per block and per sub-block
Q4_BLOCK_DTYPE = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qs", "u1", (128,))])  # 144 bytes
Q6_BLOCK, Q6_SUB = 256, 16
Q6_BLOCK_DTYPE = np.dtype([("ql", "u1", (128,)), ("qh", "u1", (64,)), ("scales", "i1", (16,)), ("d", "<f2")])  # 210 bytes
BLOCK_TYPES = {"q8": (Q8_BLOCK, Q8_BLOCK_DTYPE), "q4": (Q4_BLOCK, Q4_BLOCK_DTYPE), "q6": (Q6_BLOCK, Q6_BLOCK_DTYPE)}


def element_size(dtype):
    return DTYPES[dtype][0]


def row_bytes(dtype, columns):
    """Bytes of one stored row of `columns` values (q8, q4, q6: whole blocks, the last one padded)."""
    if dtype in BLOCK_TYPES:
        block, block_dtype = BLOCK_TYPES[dtype]
        return -(-columns // block) * block_dtype.itemsize
    return columns * element_size(dtype)


def tensor_bytes(dtype, shape):
    """Bytes of a stored tensor of `shape` (1 or 2 axes; a vector is one row)."""
    rows = shape[0] if len(shape) == 2 else 1
    return rows * row_bytes(dtype, shape[-1])


def storage_dtype(dtype):
    return DTYPES[dtype][1]


def values_dtype(dtype):
    """The numpy dtype of the values: bf16 as ml_dtypes.bfloat16 (same bytes as the storage),
    q8, q4 and q6 dequantized to float32."""
    if dtype in QUANTIZED:
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


def dequantize(blocks, dtype, columns):
    """float32 values [rows, columns] of rows of blocks of the quantized `dtype`."""
    return {"q8": dequantize_q8, "q4": dequantize_q4, "q6": dequantize_q6}[dtype](blocks, columns)


# ---- q4 (SPEC.md, "Quantized weights: q4"); every step in float32, in the order written ----

# The search's 21 candidate level counts: f32(14 + k / 10), k = 0..20 (llama.cpp's rmin = -1,
# rdelta = 0.1, nstep = 20 for 15 levels).
_Q4_CANDIDATES = np.array([14 + k / 10 for k in range(21)]).astype(np.float32)


def _sum32(v):
    """Sums over the first axis (32 values) by halving: v[i] + v[i + 16], then + 8, + 4, + 2, + 1."""
    while len(v) > 1:
        half = len(v) // 2
        v = v[:half] + v[half:]
    return v[0]


def _weighted_error(scale, low, sums):
    """sum w (scale * q + low - x)^2, expanded over the sums of the fit."""
    sum_w, sum_x, sum_xx, sum_q, sum_qq, sum_xq = sums
    two = np.float32(2)
    return (scale * (scale * sum_qq - two * sum_xq) + low * (low * sum_w - two * sum_x)
            + two * scale * low * sum_q + sum_xx)


def _fit_sub_blocks(x):
    """The scale s >= 0 and minimum m >= 0 of each column of x [32, n] (values s * q - m, q in
    0..15) that minimise the squared error weighted by w = rms(x) + |x|, searched as llama.cpp's
    make_qkx2_quants searches. (Sub-blocks are columns so that the sums add whole rows.)"""
    f32 = np.float32
    w = np.sqrt(_sum32(x * x) / f32(32)) + np.abs(x)
    low, high = np.minimum(x.min(0), f32(0)), x.max(0)
    flat = high == low
    span = np.where(flat, f32(1), high - low)
    shifted = x - low  # >= 0: the levels need no clipping at 0
    wx = w * x
    sum_w, sum_x, sum_xx = _sum32(w), _sum32(wx), _sum32(wx * x)
    q, wq = np.empty_like(x), np.empty_like(x)

    def fit(count):
        np.multiply(shifted, count / span, out=q)
        np.rint(q, out=q)
        np.minimum(q, f32(15), out=q)
        np.multiply(w, q, out=wq)
        return sum_w, sum_x, sum_xx, _sum32(wq), _sum32(wq * q), _sum32(wq * x)

    scale = f32(1) / (f32(15) / span)
    best = _weighted_error(scale, low, fit(f32(15)))
    for count in _Q4_CANDIDATES:
        sums = fit(count)
        _, _, _, sum_q, sum_qq, sum_xq = sums
        det = sum_w * sum_qq - sum_q * sum_q
        solvable = det > 0
        det = np.where(solvable, det, f32(1))
        s = (sum_w * sum_xq - sum_x * sum_q) / det
        m = (sum_qq * sum_x - sum_q * sum_xq) / det
        positive = m > 0  # the minimum is kept <= 0: s alone fits, m = 0
        s = np.where(positive, sum_xq / np.where(sum_qq > 0, sum_qq, f32(1)), s)
        m = np.where(positive, f32(0), m)
        error = _weighted_error(s, m, sums)
        better = solvable & (error < best)
        best = np.where(better, error, best)
        scale, low = np.where(better, s, scale), np.where(better, m, low)
    return np.where(flat, f32(0), scale), f32(0) - low  # +0.0 where low = 0: a block of zeros is zero bytes


def _six_bits(values, largest):
    """values in [0, largest] as integers 0..63 of largest / 63 each: round(values * (63 / largest))."""
    inverse = np.divide(np.float32(63), largest, out=np.zeros_like(largest), where=largest > 0)
    return np.clip(np.rint(inverse[:, None] * values), 0, 63).astype(np.uint8)


def quantize_q4(values):
    """Rows of float32 `values` [rows, columns] as q4 blocks [rows, ceil(columns / 256)] (SPEC.md:
    each sub-block's scale and minimum by the search, the block's 6-bit codes of them, then each
    value's 4-bit level against the stored scale and minimum). Raises DtypeOverflow when a block's
    scale exceeds the f16 range."""
    values = np.asarray(values, dtype=np.float32)
    rows, blocks, padded = _sub_blocks(values, Q4_SUB)
    columns_first = np.ascontiguousarray(padded.T)
    fits = [_fit_sub_blocks(columns_first[:, i:i + _FIT_CHUNK]) for i in range(0, len(padded), _FIT_CHUNK)]
    scale, minimum = (np.concatenate(v).reshape(-1, 8) for v in zip(*fits)) if fits else (np.zeros((0, 8), np.float32),) * 2
    largest_scale, largest_min = scale.max(-1, initial=0), minimum.max(-1, initial=0)
    if largest_scale.size and max(largest_scale.max(), largest_min.max()) / 63 > Q8_MAX_SCALE:
        raise DtypeOverflow(f"value {float(np.abs(values).max()):g} exceeds the q4 range")
    sc, mn = _six_bits(scale, largest_scale), _six_bits(minimum, largest_min)
    d, dmin = (largest_scale / np.float32(63)).astype(np.float16), (largest_min / np.float32(63)).astype(np.float16)
    step = (d.astype(np.float32)[:, None] * sc).reshape(-1)
    shift = (dmin.astype(np.float32)[:, None] * mn).reshape(-1)
    levels = np.rint((padded + shift[:, None]) / np.where(step > 0, step, np.float32(1))[:, None])
    levels = np.where(step[:, None] > 0, np.clip(levels, 0, 15), 0).astype(np.uint8).reshape(-1, 4, 2, 32)
    out = np.empty((rows, blocks), dtype=Q4_BLOCK_DTYPE)
    out["d"], out["dmin"] = d.reshape(rows, blocks), dmin.reshape(rows, blocks)
    out["scales"] = _pack_scales(sc, mn).reshape(rows, blocks, 12)
    out["qs"] = (levels[:, :, 0] | (levels[:, :, 1] << 4)).reshape(rows, blocks, 128)
    return out


_FIT_CHUNK = 8192  # sub-blocks fitted at a time: the search's arrays stay in the cache (3x faster than all at once)


def _sub_blocks(values, size):
    """float32 `values` [rows, columns] padded with zeros to whole blocks of 256 (q4, q6), as rows,
    blocks per row, and the sub-blocks of `size` values [rows * blocks * 256 / size, size]."""
    rows, columns = values.shape
    blocks = -(-columns // Q4_BLOCK)
    padded = np.zeros((rows, blocks * Q4_BLOCK), dtype=np.float32)
    padded[:, :columns] = values
    return rows, blocks, padded.reshape(-1, size)


def _pack_scales(sc, mn):
    """The 12 bytes of 8 scales and 8 minimums of 6 bits: j < 4 in the low 6 bits of bytes j
    (scale) and j + 4 (minimum); j >= 4 in the low (scale) and high (minimum) nibble of byte
    j + 4, their top 2 bits in bits 6-7 of bytes j - 4 and j."""
    out = np.empty((len(sc), 12), np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    return out


def _unpack_scales(packed):
    sc = np.empty(packed.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., 0:4], mn[..., 0:4] = packed[..., 0:4] & 63, packed[..., 4:8] & 63
    sc[..., 4:8] = (packed[..., 8:12] & 0xF) | ((packed[..., 0:4] >> 6) << 4)
    mn[..., 4:8] = (packed[..., 8:12] >> 4) | ((packed[..., 4:8] >> 6) << 4)
    return sc, mn


def dequantize_q4(blocks, columns):
    """float32 values [rows, columns] of q4 `blocks` [rows, blocks per row]: (d * sc) * q - dmin * mn,
    one rounding (the products with the 6-bit codes are exact)."""
    blocks = np.asarray(blocks).view(Q4_BLOCK_DTYPE)
    sc, mn = _unpack_scales(blocks["scales"])
    step = blocks["d"].astype(np.float32)[..., None] * sc
    shift = blocks["dmin"].astype(np.float32)[..., None] * mn
    qs = blocks["qs"].reshape(blocks.shape + (4, 32))
    levels = np.stack([qs & 0xF, qs >> 4], axis=-2).reshape(blocks.shape + (8, 32)).astype(np.float32)
    values = step[..., None] * levels - shift[..., None]
    return values.reshape(len(blocks), -1)[:, :columns]


# ---- q6 (SPEC.md, "Quantized weights: q6"); every step in float32, in the order written ----

# The search's 19 candidate level counts: 32 and then 32 + f32(0.1) * k for k = -9..9, k != 0
# (llama.cpp's make_qx_quants with nmax = 32).
_Q6_CANDIDATES = [np.float32(32) + np.float32(0.1) * np.float32(k) for k in range(-9, 10) if k]
_GROUP_MAX_EPS = np.float32(1e-15)  # llama.cpp's: a sub-block or block this small is zero


def _sum16(v):
    """Sums over the first axis (16 values) by halving: v[i] + v[i + 8], then + 4, + 2, + 1."""
    while len(v) > 1:
        half = len(v) // 2
        v = v[:half] + v[half:]
    return v[0]


def _fit_q6_sub_blocks(x):
    """The scale s of each column of x [16, n] (values s * l, l in -32..31) that the search finds
    (SPEC.md, q6 step 1): the least-squares scale weighted by x^2 for the levels of 19 candidate
    steps, the best kept."""
    f32 = np.float32
    magnitude = np.abs(x)
    largest = np.take_along_axis(x, magnitude.argmax(0)[None], 0)[0]  # the first x of largest |x|
    zero = magnitude.max(0) < _GROUP_MAX_EPS
    largest = np.where(zero, f32(1), largest)
    w = x * x
    wx = w * x

    def sums(count):
        iscale = -count / largest
        levels = np.clip(np.rint(iscale * x), -32, 31)
        wl = w * levels
        return _sum16(wx * levels), _sum16(wl * levels)

    sum_lx, sum_ll = sums(f32(32))
    scale = np.where(sum_ll > 0, sum_lx / np.where(sum_ll > 0, sum_ll, f32(1)), f32(0))
    best = scale * sum_lx
    for count in _Q6_CANDIDATES:
        sum_lx, sum_ll = sums(count)
        better = (sum_ll > 0) & (sum_lx * sum_lx > best * sum_ll)
        fitted = sum_lx / np.where(sum_ll > 0, sum_ll, f32(1))
        scale = np.where(better, fitted, scale)
        best = np.where(better, fitted * sum_lx, best)
    return np.where(zero, f32(0), scale)


def quantize_q6(values):
    """Rows of float32 `values` [rows, columns] as q6 blocks [rows, ceil(columns / 256)] (SPEC.md:
    each sub-block's scale by the search, the block's 8-bit codes of them against its f16 scale,
    then each value's 6-bit level against what is stored). Raises DtypeOverflow when a block's
    scale exceeds the f16 range."""
    f32 = np.float32
    values = np.asarray(values, dtype=np.float32)
    rows, blocks, subs = _sub_blocks(values, Q6_SUB)
    columns_first = np.ascontiguousarray(subs.T)
    with np.errstate(over="ignore", under="ignore"):  # IEEE's infinities and zeros decide (SPEC.md)
        fits = [_fit_q6_sub_blocks(columns_first[:, i:i + _FIT_CHUNK]) for i in range(0, len(subs), _FIT_CHUNK)]
    scale = np.concatenate(fits).reshape(-1, 16) if fits else np.zeros((0, 16), np.float32)
    largest = np.take_along_axis(scale, np.abs(scale).argmax(-1)[:, None], -1)[:, 0] if len(scale) else np.zeros(0, np.float32)
    zero = np.abs(largest) < _GROUP_MAX_EPS
    iscale = f32(-128) / np.where(zero, f32(1), largest)
    with np.errstate(over="ignore"):
        d = np.where(zero, f32(0), f32(1) / iscale).astype(np.float16)
    if np.isinf(d).any():
        raise DtypeOverflow(f"value {float(np.abs(values).max()):g} exceeds the q6 range")
    sc = np.where(zero[:, None], 0, np.clip(np.rint(iscale[:, None] * scale), -128, 127)).astype(np.int8)
    step = (d.astype(np.float32)[:, None] * sc.astype(np.float32)).reshape(-1)
    levels = np.rint(subs / np.where(step != 0, step, f32(1))[:, None])
    levels = np.where(step[:, None] != 0, np.clip(levels, -32, 31) + 32, 0).astype(np.uint8)  # 0 under a zero step: zero bytes
    levels = levels.reshape(rows * blocks, 2, 4, 32)  # [block, half, quarter, l]: value 128h + 32c + l
    out = np.empty((rows, blocks), dtype=Q6_BLOCK_DTYPE)
    low, high = levels & 0xF, levels >> 4
    out["ql"] = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(rows, blocks, 128)
    out["qh"] = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(rows, blocks, 64)
    out["scales"], out["d"] = sc.reshape(rows, blocks, 16), d.reshape(rows, blocks)
    return out


def dequantize_q6(blocks, columns):
    """float32 values [rows, columns] of q6 `blocks` [rows, blocks per row]: (d * sc) * (q - 32),
    rounded once (the product of d with the 8-bit scale is exact)."""
    blocks = np.asarray(blocks).view(Q6_BLOCK_DTYPE)
    ql = blocks["ql"].reshape(blocks.shape + (2, 2, 32))  # [half, pair, l]
    qh = blocks["qh"].reshape(blocks.shape + (2, 1, 32))
    low = np.concatenate([ql & 0xF, ql >> 4], axis=-2)  # [half, quarter, l]
    high = (qh >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
    levels = (low | (high << 4)).astype(np.float32) - np.float32(32)
    step = blocks["d"].astype(np.float32)[..., None] * blocks["scales"].astype(np.float32)
    values = step.reshape(blocks.shape + (16, 1)) * levels.reshape(blocks.shape + (16, 16))
    return values.reshape(len(blocks), -1)[:, :columns]
