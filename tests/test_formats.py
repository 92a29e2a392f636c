"""Weight encodings against the oracle's independent implementations and the documented facts."""

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jax_wqmm as wq
import oracle
from jax_wqmm import formats


# ----------------------------------------------------------------------------- FRACTAL_NZ

@pytest.mark.parametrize("dtype,c0", [(np.int8, 32), (ml_dtypes.int4, 64), (np.float16, 16)])
@pytest.mark.parametrize("rows,cols", [(16, 32), (33, 70), (1, 1), (64, 128)])
def test_nz_matches_index_formula(dtype, c0, rows, cols):
    rng = np.random.default_rng(0)
    nd = rng.integers(-8, 8, (rows, cols)).astype(np.int8).astype(dtype)
    nz = formats.to_fractal_nz(nd)
    assert nz.shape == (-(-cols // c0), -(-rows // 16), 16, c0)
    want = oracle.nd_to_nz(nd.astype(np.int8), c0).astype(dtype)
    np.testing.assert_array_equal(np.asarray(nz).astype(np.int8), want.astype(np.int8))
    back = formats.from_fractal_nz(jnp.asarray(nz), (rows, cols))
    np.testing.assert_array_equal(np.asarray(back).astype(np.int8), nd.astype(np.int8))


def test_nz_documented_example_shape():
    # int8 (k, n) -> (ceil(n/32), ceil(k/16), 16, 32)
    assert formats.to_fractal_nz(np.zeros((4096, 11008), np.int8)).shape == (344, 256, 16, 32)


def test_from_nz_rejects_mismatched_shape():
    with pytest.raises(ValueError, match="not the FRACTAL_NZ storage"):
        formats.from_fractal_nz(np.zeros((2, 4, 16, 32), np.int8), (100, 48))


# ----------------------------------------------------------------------------- int4 in int32

def test_int4_pack_bit_positions():
    # element j of each 8 in bits 4j..4j+3 (low nibble first)
    q = np.array([[1, -1, 2, -8, 7, 0, 3, -2]], np.int8)
    packed = wq.pack_int4_to_int32(q)
    assert packed.dtype == np.int32 and packed.shape == (1, 1)
    want = sum(((int(v) & 0xF) << (4 * j)) for j, v in enumerate(q[0]))
    assert int(packed.view(np.uint32)[0, 0]) == want
    # little-endian bytes: byte i holds elements 2i (low nibble) and 2i+1 (high nibble)
    b = packed.view(np.uint8).reshape(-1)
    assert b[0] == (1 | (0xF << 4)) and b[1] == (2 | (0x8 << 4))


def test_int4_pack_roundtrip():
    rng = np.random.default_rng(1)
    q = rng.integers(-8, 8, (5, 64)).astype(np.int8).astype(ml_dtypes.int4)
    p = wq.pack_int4_to_int32(q)
    assert p.shape == (5, 8)
    u = wq.unpack_int32_to_int4(p)
    assert u.dtype == ml_dtypes.int4
    np.testing.assert_array_equal(u.astype(np.int8), q.astype(np.int8))


def test_int4_pack_matches_xla_s4_layout():
    """torch_npu's int32 packing, seen as bytes, is XLA's packed S4 layout."""
    rng = np.random.default_rng(2)
    q = rng.integers(-8, 8, (3, 16)).astype(np.int8)
    bytes_ = wq.pack_int4_to_int32(q).view(np.uint8).reshape(3, 8)
    lo = (bytes_ & 0xF).astype(np.int8)
    hi = (bytes_ >> 4).astype(np.int8)
    inter = np.stack([lo, hi], -1).reshape(3, 16)
    np.testing.assert_array_equal(np.where(inter >= 8, inter - 16, inter), q)


@pytest.mark.parametrize("bad,match", [(np.zeros((2, 7), np.int8), "multiple of 8"),
                                       (np.full((1, 8), 9, np.int8), r"\[-8, 7\]")])
def test_int4_pack_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        wq.pack_int4_to_int32(bad)


# ----------------------------------------------------------------------------- HiFloat8

def test_hifloat8_decode_matches_bitfield_oracle():
    table = formats.hifloat8_decode_table()
    for code in range(256):
        want = oracle.HIF8[code]
        if np.isnan(want):
            assert np.isnan(table[code]), hex(code)
        else:
            assert table[code] == want, (hex(code), table[code], want)


@pytest.mark.parametrize("code,value", [(0x00, 0.0), (0x6E, 32768.0), (0xEE, -32768.0),
                                        (0x6F, np.inf), (0xEF, -np.inf), (0x01, 2.0**-22),
                                        (0x07, 2.0**-16), (0x08, 1.0), (0x09, 1.125)])
def test_hifloat8_known_codes(code, value):
    assert formats.hifloat8_decode_table()[code] == value
    assert np.isnan(formats.hifloat8_decode_table()[0x80])


def test_hifloat8_encode_roundtrips_every_finite_code():
    table = formats.hifloat8_decode_table()
    codes = np.array([c for c in range(256) if np.isfinite(table[c]) and c != 0x80], np.uint8)
    enc = np.asarray(wq.float_to_hifloat8(jnp.asarray(table[codes])))
    np.testing.assert_array_equal(table[enc], table[codes])


def test_hifloat8_encode_is_nearest_and_saturates_when_asked():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(2000) * 10.0 ** rng.uniform(-6, 4, 2000), [1e9, -1e9, 0.0]])
    x = x.astype(np.float32)
    enc = np.asarray(jax.jit(lambda v: wq.float_to_hifloat8(v, saturate=True))(jnp.asarray(x)))
    dec = formats.hifloat8_decode_table()[enc].astype(np.float64)
    finite = oracle.HIF8[np.isfinite(oracle.HIF8)]
    best = np.min(np.abs(finite[None, :] - x[:, None].astype(np.float64)), axis=1)
    clipped = np.clip(x, -32768, 32768)
    np.testing.assert_allclose(np.abs(dec - clipped), np.minimum(best, np.abs(dec - clipped)), rtol=0, atol=0)
    assert dec[-3] == 32768 and dec[-2] == -32768 and dec[-1] == 0
    assert np.asarray(wq.float_to_hifloat8(jnp.array([np.nan])))[0] == 0x80


def test_hifloat8_decode_jnp_and_numpy_agree():
    codes = np.arange(256, dtype=np.uint8)
    a = np.asarray(wq.hifloat8_to_float32(jnp.asarray(codes)))
    b = wq.hifloat8_to_float32(codes)
    np.testing.assert_array_equal(np.nan_to_num(a), np.nan_to_num(b))


# ----------------------------------------------------------------------------- HiFloat8 vs CANN

# CANN GE's golden (IEEE bits -> HiFloat8 code) pairs, verbatim from hicann/ge
# tests/ge/ut/ge/common/hif8_unittest.cc (fp32_to_hif8_golden, fp16_to_hif8_golden).
GE_FP32 = [
    (0b00110110001110001100001010010000, 0b00000100), (0b00110110100110001010111010110110, 0b00000101),
    (0b00110110111001010001010111011101, 0b00000110), (0b00110111000111000010111111111000, 0b00000110),
    (0b00110101100010110100111101100111, 0b00000011),
    (0b00111111010010001000010010011110, 0b00011101), (0b00111100111111011100011111001101, 0b01010100),
    (0b00111111000100010010101000101100, 0b00011001), (0b00111111011001010101100101100101, 0b00011110),
    (0b00111110001000000100000011101101, 0b00111010),
    (0b01000011010000010001001110000011, 0b01001110), (0b01000011100011100000111000100001, 0b01100000),
    (0b01000010001101010110001110001001, 0b01000110), (0b01000011101100110000100011011011, 0b01100001),
    (0b01000010010100110110101100100101, 0b01000111),
    (0b01000110100001101100011111100111, 0b01101100), (0b01000110111000011100101001001010, 0b01101110),
    (0b01000101001111010110110100011011, 0b01100111), (0b01000110001010110000101110111111, 0b01101011),
    (0b01000111010000110101000001011110, 0b01101111),
]
GE_FP16 = [
    (0b0000000000000101, 0b00000001), (0b0000000000001000, 0b00000010), (0b0000000000101100, 0b00000100),
    (0b0000000000110011, 0b00000101), (0b0000000010001101, 0b00000110),
    (0b0010100010011011, 0b01010101), (0b0011011100010110, 0b00110110), (0b0010111001111001, 0b01010010),
    (0b0011101101101001, 0b00011111), (0b0011100011111100, 0b00011010),
    (0b0110011111011111, 0b01100110), (0b0110010011110011, 0b01100100), (0b0110010110001101, 0b01100101),
    (0b0110000001110000, 0b01100010), (0b0110100100011111, 0b01100111),
    (0b0111100001110001, 0b01101110), (0b0111011110101110, 0b01101110), (0b0111010001101110, 0b01101100),
    (0b0111000100011011, 0b01101011), (0b0111100111101010, 0b01101111),
]


@pytest.mark.parametrize("pairs,storage", [(GE_FP32, np.uint32), (GE_FP16, np.uint16)], ids=["fp32", "fp16"])
def test_hifloat8_encoder_matches_cann_ge_goldens(pairs, storage):
    dtype = np.float32 if storage == np.uint32 else np.float16
    x = np.array([b for b, _ in pairs], storage).view(dtype)
    want = np.array([c for _, c in pairs], np.uint8)
    np.testing.assert_array_equal(np.asarray(wq.float_to_hifloat8(jnp.asarray(x))), want)
    np.testing.assert_array_equal(wq.float_to_hifloat8(x), want)  # the NumPy path too
    # negated inputs give the same codes with the sign bit
    np.testing.assert_array_equal(np.asarray(wq.float_to_hifloat8(jnp.asarray(-x))), want | 0x80)


def test_hifloat8_infinity_is_not_saturated_unless_asked():
    x = jnp.asarray([40959.996, 40960.0, 1e6, np.inf, -40960.0, -np.inf, -0.0, np.nan], jnp.float32)
    np.testing.assert_array_equal(np.asarray(wq.float_to_hifloat8(x)),
                                  [0x6E, 0x6F, 0x6F, 0x6F, 0xEF, 0xEF, 0x00, 0x80])
    np.testing.assert_array_equal(np.asarray(wq.float_to_hifloat8(x, saturate=True)),
                                  [0x6E, 0x6E, 0x6E, 0x6E, 0xEE, 0xEE, 0x00, 0x80])


def test_every_hifloat8_code_survives_decode_then_encode():
    codes = np.arange(256, dtype=np.uint8)
    values = wq.hifloat8_to_float32(codes)
    back = np.asarray(wq.float_to_hifloat8(jnp.asarray(values)))
    np.testing.assert_array_equal(back, codes)


def test_hifloat8_agrees_with_en_dtypes_on_every_code_and_a_dense_sweep():
    import en_dtypes  # a test dependency ([test] extra)

    h = en_dtypes.hifloat8
    codes = np.arange(256, dtype=np.uint8)
    theirs = codes.view(h).astype(np.float32)
    ours = wq.hifloat8_to_float32(codes)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    np.testing.assert_array_equal(ours[~np.isnan(ours)], theirs[~np.isnan(theirs)])
    rng = np.random.default_rng(11)
    sweep = np.concatenate([
        np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32),  # every fp16
        (rng.choice([-1, 1], 300_000) * 10.0 ** rng.uniform(-9, 6, 300_000)).astype(np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 32768, 36864, 40959.996, 40960, 49152, 65536,
                  2.0**-23, 2.0**-23 * 0.999, 2.0**-24], np.float32)])
    with np.errstate(invalid="ignore"):  # NaN in the sweep: NumPy warns on the cast
        want = sweep.astype(h).view(np.uint8)
    got = np.asarray(jax.jit(wq.float_to_hifloat8)(jnp.asarray(sweep)))
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, (sweep[bad[:5]], got[bad[:5]], want[bad[:5]])
