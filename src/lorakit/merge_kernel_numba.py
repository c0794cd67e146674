"""The numba code behind :mod:`lorakit.merge_kernel` (imported by it only when numba is installed).

Bit patterns travel as integers (int32 for float32 weights, int16 for bfloat16/float16, ``kind`` 0/1/2); values
are computed in float32 exactly as PyTorch computes ``W + Δ`` for these dtypes: widen (exact), add in float32,
round once to the weight's dtype (nearest even). Compiled with ``fastmath`` off (no fused multiply-add, no
reassociation), so each operation rounds as IEEE 754 says.

A few operations numba has no word for are written as LLVM IR (``@intrinsic``): bit casts, a cache prefetch, a
64-lane compare whose mask comes back as an integer, and (LLVM 19 and later) ``vector.compress``, which packs the
non-zero steps of 16 elements at once. They change no arithmetic, only how the same results are found.
"""

from __future__ import annotations


import numpy as np
from llvmlite import ir
from llvmlite.binding import llvm_version_info
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

BLOCK = 1 << 16
HALF_BLOCK = 1 << 15


def _resize(builder, value, source: int, width: int):
    """An integer of ``source`` bits as one of ``width`` bits (truncated or sign-extended)."""
    if source > width:
        return builder.trunc(value, ir.IntType(width))
    return builder.sext(value, ir.IntType(width)) if source < width else value


@intrinsic
def _f32_from_i32(typingctx, x):
    """The float32 whose bit pattern is the low 32 bits of integer ``x``."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(_resize(builder, args[0], x.bitwidth, 32), ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def _i32_from_f32(typingctx, x):
    if x != types.float32:
        return None
    return types.int32(x), lambda context, builder, sig, args: builder.bitcast(args[0], ir.IntType(32))


@intrinsic
def _f32_from_f16bits(typingctx, x):
    """The float32 value of the float16 whose bit pattern is the low 16 bits of integer ``x``."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        half = builder.bitcast(_resize(builder, args[0], x.bitwidth, 16), ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def _f16bits_from_f32(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):  # IEEE round to nearest even, subnormals and overflow included
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.int16(x), codegen


@njit(cache=True, inline="always")
def _load(b, kind):
    """The float32 value of bit pattern ``b`` (an int32 holding the weight element's bits)."""
    if kind == 0:
        return _f32_from_i32(np.int32(b))
    if kind == 1:
        return _f32_from_i32(np.int32((np.int64(b) & 0xFFFF) << 16))
    return _f32_from_f16bits(np.int16(b))


@njit(cache=True, inline="always")
def _store(x, kind):
    """The bit pattern (as int32) of float32 ``x`` rounded to the weight's dtype (nearest even)."""
    if kind == 0:
        return _i32_from_f32(x)
    if kind == 1:  # finite or ±inf only (callers check): NaN would need PyTorch's per-loop NaN patterns
        u = np.int64(_i32_from_f32(x)) & 0xFFFFFFFF
        u += 0x7FFF + ((u >> 16) & 1)
        return np.int32(np.int16((u >> 16) & 0xFFFF))
    return np.int32(_f16bits_from_f32(x))


@njit(cache=True, inline="always")
def _wrap(x, kind):
    """``x`` wrapped to the weight's integer width (PyTorch's integer subtraction on the bit patterns)."""
    if kind == 0:
        return np.int64(np.int32(x))
    return np.int64(np.int16(x))


@njit(cache=True, nogil=True)
def _apply_record(bits, kind, limit, counts, offsets, steps, escape_index, escape_bits):
    """Add the recorded steps, then write the escapes, at positions below ``limit``."""
    p = 0
    for block in range(counts.size):
        base = block * BLOCK + HALF_BLOCK
        end = p + counts[block]
        while p < end:
            pos = base + np.int64(offsets[p])
            if pos >= limit:
                break
            bits[pos] = _wrap(np.int64(bits[pos]) + np.int64(steps[p]), kind)
            p += 1
        if p < end:
            break
    for e in range(escape_index.size):
        if escape_index[e] >= limit:
            break
        bits[escape_index[e]] = escape_bits[e]


@njit(cache=True, nogil=True)
def _add_dense(bits, delta, scale, kind, sign, limit):
    """``bits[:limit] = round(value + sign · delta · scale)``."""
    for i in range(limit):
        d = delta[i] * scale
        v = _load(bits[i], kind)
        bits[i] = _store(v + d if sign > 0 else v - d, kind)


CHUNK = 4096  # elements computed while cache-resident before they are recorded
F32_EXP, BF16_EXP, F16_EXP = 0x7F800000, 0x7F80, 0x7C00  # exponent bits: all set means inf or nan


@intrinsic
def _prefetch(typingctx, address):
    """Ask the CPU to bring the cache line at integer ``address`` in (a hint: never faults, changes nothing)."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        i8p, i32 = ir.PointerType(ir.IntType(8)), ir.IntType(32)  # typed pointers: older LLVMs (numba 0.60) too
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        builder.call(fn, [builder.inttoptr(args[0], i8p), ir.Constant(i32, 0), ir.Constant(i32, 3),
                          ir.Constant(i32, 1)])  # read, keep in all cache levels, data
        return context.get_dummy_value()

    return types.void(address), codegen


@njit(cache=True, nogil=True, inline="always")
def _bf16(x):
    """float32 → bfloat16 bits, round to nearest even (finite or ±inf ``x``)."""
    u = np.int64(_i32_from_f32(x)) & 0xFFFFFFFF
    return np.int16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)


@njit(cache=True, nogil=True, inline="always")
def _from_bf16(b):
    return _f32_from_i32(np.int32((np.int64(b) & 0xFFFF) << 16))


# What a plain subtraction gives back from merged bits ``mb`` (as the weight's integer type), per weight dtype:
# the dense merge loops compute ``k`` from it, and a chunk put back or an escape recomputes the original from it
# (``original = back + k``, wrapping), so both must be these very expressions.
@njit(cache=True, nogil=True, inline="always")
def _back_f32(mb, d):
    return _i32_from_f32(_f32_from_i32(mb) - d)


@njit(cache=True, nogil=True, inline="always")
def _back_bf16(mb, d):
    return _bf16(_from_bf16(mb) - d)


@njit(cache=True, nogil=True, inline="always")
def _back_f16(mb, d):
    return _f16bits_from_f32(_f32_from_f16bits(mb) - d)


@njit(cache=True, nogil=True, inline="always")
def _original(mb, d, k, kind):
    """The original bits of a merged element from its merged bits, scaled delta and ``k`` (wrapping)."""
    if kind == 0:
        return np.int32(_back_f32(mb, d) + k)
    if kind == 1:
        return np.int16(_back_bf16(mb, d) + k)
    return np.int16(_back_f16(mb, d) + k)


# One dense loop per weight dtype, branch-free so that the compiler vectorizes it: the merged value goes straight
# into the weight, ``k`` (original minus what a plain subtraction gives back, wrapped to the weight's width) into
# ``ks``. The originals are not kept: ``_original`` recomputes them from the merged bits and ``k``.
@njit(cache=True, nogil=True)
def _merge_f32(bits, delta, scale, ks):
    bad = 0
    for j in range(bits.size):
        o = bits[j]
        d = delta[j] * scale
        mb = _i32_from_f32(_f32_from_i32(o) + d)
        bad |= (mb & F32_EXP) == F32_EXP
        ks[j] = o - _back_f32(mb, d)
        bits[j] = mb
    return bad == 0


@njit(cache=True, nogil=True)
def _merge_bf16(bits, delta, scale, ks):
    bad = 0
    for j in range(bits.size):
        o = bits[j]
        d = delta[j] * scale
        mb = _bf16(_from_bf16(o) + d)
        bad |= (mb & BF16_EXP) == BF16_EXP
        ks[j] = np.int16(o - _back_bf16(mb, d))
        bits[j] = mb
    return bad == 0


@njit(cache=True, nogil=True)
def _merge_f16(bits, delta, scale, ks):
    bad = 0
    for j in range(bits.size):
        o = bits[j]
        d = delta[j] * scale
        mb = _f16bits_from_f32(_f32_from_f16bits(o) + d)
        bad |= (mb & F16_EXP) == F16_EXP
        ks[j] = np.int16(o - _back_f16(mb, d))
        bits[j] = mb
    return bad == 0


@intrinsic
def _lowest_bit(typingctx, x):
    """Index of the lowest set bit of a non-zero uint64."""
    if x != types.uint64:
        return None

    def codegen(context, builder, sig, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return types.uint64(x), codegen


@intrinsic
def _nonzero_mask64(typingctx, address):
    """Bit ``t`` set where the int32 at integer ``address`` + 4 t is non-zero (``t`` < 64): one vector compare of
    64 lanes and its mask as an integer (a few instructions, where a loop of shifts builds it slowly)."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        lanes = ir.VectorType(ir.IntType(32), 64)
        ks = builder.load(builder.inttoptr(args[0], ir.PointerType(lanes)))
        ks.align = 4
        return builder.bitcast(builder.icmp_signed("!=", ks, ir.Constant(lanes, [0] * 64)), ir.IntType(64))

    return types.uint64(address), codegen


@njit(cache=True, nogil=True)
def _nonzero_masks(ks, size, masks):
    """Bit ``t`` of ``masks[g]`` says whether ``ks[64 g + t]`` is non-zero (``ks`` padded with zeros to a multiple
    of 64)."""
    ks[size:(size + 63) // 64 * 64] = 0
    at = ks.ctypes.data
    for g in range((size + 63) // 64):
        masks[g] = _nonzero_mask64(at + 256 * g)


@njit(cache=True, nogil=True, inline="always")
def _prefetch_lines(address, lines):
    """Prefetch ``lines`` cache lines (64 bytes) from ``address``."""
    for q in range(lines):
        _prefetch(address + 64 * q)


@intrinsic
def _popcount(typingctx, x):
    """Number of set bits of a uint64."""
    if x != types.uint64:
        return None

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64]), "llvm.ctpop.i64")
        return builder.call(fn, [args[0]])

    return types.uint64(x), codegen


@intrinsic
def _compress16(typingctx, ks_at, offsets_at, steps_at, first):
    """The 16 int32 ``k`` at integer address ``ks_at``: the positions (``first`` + lane, as int16) of the non-zero
    ones packed to ``offsets_at`` and their ``k`` (as int8) to ``steps_at``, 16 lanes written of which those past
    the count are junk; returns the count, or -1 (nothing to count) if one does not fit a byte. LLVM's generic
    ``vector.compress``: AVX-512 compresses in one instruction, other targets get a branch-free sequence."""
    def codegen(context, builder, sig, args):
        i1, i8, i16, i32, i64 = (ir.IntType(w) for w in (1, 8, 16, 32, 64))
        lanes = [ir.VectorType(t, 16) for t in (i1, i8, i16, i32)]
        ks = builder.load(builder.inttoptr(args[0], ir.PointerType(lanes[3])))
        ks.align = 4
        nonzero = builder.icmp_signed("!=", ks, ir.Constant(lanes[3], [0] * 16))

        def packed(values, t, address, align):
            kind = ir.VectorType(t, 16)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(kind, [kind, lanes[0], kind]),
                                                f"llvm.experimental.vector.compress.v16i{t.width}")
            store = builder.store(builder.call(fn, [values, nonzero, ir.Constant(kind, ir.Undefined)]),
                                  builder.inttoptr(address, ir.PointerType(kind)))
            store.align = align

        first = builder.insert_element(ir.Constant(lanes[2], ir.Undefined), builder.trunc(args[3], i16),
                                       ir.Constant(i32, 0))
        first = builder.shuffle_vector(first, ir.Constant(lanes[2], ir.Undefined), ir.Constant(lanes[3], [0] * 16))
        packed(builder.add(first, ir.Constant(lanes[2], list(range(16)))), i16, args[1], 2)
        packed(builder.trunc(ks, lanes[1]), i8, args[2], 1)
        ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i16, [i16]), "llvm.ctpop.i16")
        count = builder.zext(builder.call(ctpop, [builder.bitcast(nonzero, i16)]), i64)
        wide = builder.or_(builder.icmp_signed("<", ks, ir.Constant(lanes[3], [-128] * 16)),
                           builder.icmp_signed(">", ks, ir.Constant(lanes[3], [127] * 16)))
        fits = builder.icmp_unsigned("==", builder.bitcast(wide, i16), ir.Constant(i16, 0))
        return builder.select(fits, count, ir.Constant(i64, -1))

    return types.int64(types.intp, types.intp, types.intp, types.int64), codegen


@njit(cache=True, nogil=True, inline="always")
def _record_bits(m, base, start, low, chunk, part, scale, kind, ks, record, ns, ne):
    """Append the elements ``base + t`` for the set bits ``t`` of mask ``m`` (steps, or escapes)."""
    counts, offsets, steps, escape_index, escape_bits = record
    while m != 0:
        j = base + np.int64(_lowest_bit(m))
        m &= m - np.uint64(1)
        k = ks[j]
        if -128 <= k <= 127:
            offsets[ns] = np.int16(low + j)
            steps[ns] = np.int8(k)
            ns += 1
        else:
            escape_index[ne] = start + j
            escape_bits[ne] = _original(chunk[j], part[j] * scale, k, kind)
            ne += 1
    return ns, ne


@njit(cache=True, nogil=True)
def _record_group_packed(g, m, start, low, chunk, part, scale, kind, ks, record, ns, ne):
    """The 64 elements of group ``g`` (mask ``m``) by :func:`_compress16`, a quarter at a time: the same work
    however many are non-zero (the mask loop's branches mispredict about once per element then)."""
    ks_at, offsets_at, steps_at = ks.ctypes.data, record[1].ctypes.data, record[2].ctypes.data
    for q in range(4):
        base = g * 64 + q * 16
        found = _compress16(ks_at + 4 * base, offsets_at + 2 * ns, steps_at + ns, low + base)
        if found >= 0:
            ns += found
        else:  # a k that needs an escape: this quarter element by element
            ns, ne = _record_bits((m >> np.uint64(q * 16)) & np.uint64(0xFFFF), base, start, low, chunk, part,
                                  scale, kind, ks, record, ns, ne)
    return ns, ne


@njit(cache=True, nogil=True)
def _record_group_bits(g, m, start, low, chunk, part, scale, kind, ks, record, ns, ne):
    return _record_bits(m, g * 64, start, low, chunk, part, scale, kind, ks, record, ns, ne)


# LLVM has a generic vector compress from version 19 on (numba 0.61+); older ones visit every non-zero element.
_record_group_dense = _record_group_packed if llvm_version_info >= (19,) else _record_group_bits
DENSE = 16  # a chunk with more than one non-zero k in this many elements is recorded by the packed way


@njit(cache=True, nogil=True)
def _record_chunk(start, chunk, part, scale, kind, ks, masks, record, ns, ne, ahead):
    """Append the chunk's non-zero ``k`` (as steps, or as escapes when they do not fit a byte), visiting only
    them where they are few: most elements of a small update have none. Meanwhile prefetch the next chunk
    (``ahead``: addresses and byte sizes of its weight and delta parts): the dense loop then finds it in cache
    instead of waiting on memory."""
    size = chunk.size
    _nonzero_masks(ks, size, masks)
    low = (start & (BLOCK - 1)) - HALF_BLOCK
    groups = (size + 63) // 64
    total = 0
    for g in range(groups):
        total += _popcount(masks[g])
    dense = total * DENSE > size
    bits_at, bits_bytes, delta_at, delta_bytes = ahead
    per_group = (max(bits_bytes, delta_bytes) + 64 * groups - 1) // (64 * groups)  # lines of each, per group
    for g in range(groups):
        at = g * per_group * 64
        _prefetch_lines(bits_at + at, min(per_group, max(0, bits_bytes - at + 63) // 64))
        _prefetch_lines(delta_at + at, min(per_group, max(0, delta_bytes - at + 63) // 64))
        m = masks[g]
        if dense:
            ns, ne = _record_group_dense(g, m, start, low, chunk, part, scale, kind, ks, record, ns, ne)
        else:
            ns, ne = _record_group_bits(g, m, start, low, chunk, part, scale, kind, ks, record, ns, ne)
    return ns, ne


@njit(cache=True, nogil=True)
def _put_back(chunk, part, scale, kind, ks):
    """Undo a dense loop's chunk: every element back to its original bits."""
    for j in range(chunk.size):
        chunk[j] = _original(chunk[j], part[j] * scale, ks[j], kind)


@njit(cache=True, nogil=True)
def merge_pass(bits, delta, scale, kind):
    """Merge in place and record; returns ``(True, counts, offsets, steps, escape_index, escape_bits)`` (the
    record's fields, fresh arrays of their exact sizes), or ``False`` (and empty arrays) with ``bits`` restored where a
    merged value is not finite. ``kind``: 0 float32 (int32 ``bits``), 1 bfloat16, 2 float16 (int16 ``bits``)."""
    n = bits.size
    counts = np.zeros(n // BLOCK + 1, np.int32)
    # Room for every element; only what is written is touched (the pages of the rest are never faulted in).
    offsets, steps = np.empty(n + 64, np.int16), np.empty(n + 64, np.int8)  # + junk lanes of packed writes
    escape_index, escape_bits = np.empty(n, np.int64), np.empty(n, bits.dtype)
    ns, ne = _merge_chunks(bits, delta, scale, kind, (counts, offsets, steps, escape_index, escape_bits))
    if ns < 0:
        return False, counts[:0], offsets[:0], steps[:0], escape_index[:0], escape_bits[:0]
    return True, counts, offsets[:ns].copy(), steps[:ns].copy(), escape_index[:ne].copy(), escape_bits[:ne].copy()


@njit(cache=True, nogil=True)
def _merge_chunks(bits, delta, scale, kind, record):
    """:func:`merge_pass` into ``record``'s arrays; returns how many steps and escapes, or ``(-1, -1)``."""
    counts, offsets, steps, escape_index, escape_bits = record
    ns = 0
    ne = 0
    n = bits.size
    ks = np.empty(CHUNK + 64, np.int32)
    masks = np.empty(CHUNK // 64 + 1, np.uint64)
    bits_at, delta_at, width = bits.ctypes.data, delta.ctypes.data, bits.itemsize
    first = 0
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        chunk, part = bits[start:stop], delta[start:stop]
        if kind == 0:
            ok = _merge_f32(chunk, part, scale, ks)
        elif kind == 1:
            ok = _merge_bf16(chunk, part, scale, ks)
        else:
            ok = _merge_f16(chunk, part, scale, ks)
        if not ok:
            _put_back(chunk, part, scale, kind, ks)
            _add_dense(bits, delta, scale, kind, -1, start)
            _apply_record(bits, kind, start, counts, offsets[:ns], steps[:ns], escape_index[:ne], escape_bits[:ne])
            return -1, -1
        if start & (BLOCK - 1) == 0:
            first = ns  # the first step of this 65536-element block
        following = min(stop + CHUNK, n) - stop
        ahead = (bits_at + stop * width, following * width, delta_at + stop * 4, following * 4)
        ns, ne = _record_chunk(start, chunk, part, scale, kind, ks, masks, record, ns, ne, ahead)
        counts[start >> 16] = ns - first
    return ns, ne


UNMERGE_CHUNK = 1024  # checked, then subtracted: small enough that the second loop finds it in the first-level cache


# Unmerging checks a chunk before changing it (what decides is the input, not the result: a merged value or a
# product that is not finite), then subtracts in a second loop over the chunk, now in cache.
@njit(cache=True, nogil=True)
def _finite_chunk(bits, delta, scale, kind):
    """Whether every element of the chunk and its scaled delta is finite."""
    exponent = F32_EXP if kind == 0 else (BF16_EXP if kind == 1 else F16_EXP)
    bad = 0
    for j in range(bits.size):
        bad |= ((bits[j] & exponent) == exponent) | ((_i32_from_f32(delta[j] * scale) & F32_EXP) == F32_EXP)
    return bad == 0


@njit(cache=True, nogil=True)
def _unmerge_f32(bits, delta, scale):
    for j in range(bits.size):
        bits[j] = _i32_from_f32(_f32_from_i32(bits[j]) - delta[j] * scale)


@njit(cache=True, nogil=True)
def _unmerge_bf16(bits, delta, scale):
    for j in range(bits.size):
        bits[j] = _bf16(_from_bf16(bits[j]) - delta[j] * scale)


@njit(cache=True, nogil=True)
def _unmerge_f16(bits, delta, scale):
    for j in range(bits.size):
        bits[j] = _f16bits_from_f32(_f32_from_f16bits(bits[j]) - delta[j] * scale)


@njit(cache=True, nogil=True)
def _apply_chunk(bits, kind, start, stop, p, end, offsets, steps, e, escape_index, escape_bits):
    """Add the steps ``p`` … (below ``end``, the last of this block) and write the escapes ``e`` … that fall
    before ``stop``; returns the next ``p`` and ``e``."""
    base = (start & ~(BLOCK - 1)) + HALF_BLOCK
    while p < end:
        pos = np.uint64(base + np.int64(offsets[p]))  # unsigned: no check for negative indices
        if pos >= stop:
            break
        bits[pos] += steps[p]  # stored back in the weight's width: wraps
        p += 1
    while e < escape_index.size and escape_index[e] < stop:
        bits[escape_index[e]] = escape_bits[e]
        e += 1
    return p, e


@njit(cache=True, nogil=True)
def unmerge_pass(bits, delta, scale, kind, counts, offsets, steps, escape_index, escape_bits):
    """Unmerge in place with the record, chunk by chunk (check, subtract, then that chunk's steps and escapes,
    while it is in cache); ``False`` with ``bits`` unchanged where a merged value or the product is not finite."""
    n = bits.size
    p = 0
    e = 0
    end = 0
    for start in range(0, n, UNMERGE_CHUNK):
        stop = min(start + UNMERGE_CHUNK, n)
        chunk, part = bits[start:stop], delta[start:stop]
        if not _finite_chunk(chunk, part, scale, kind):
            _add_dense(bits, delta, scale, kind, 1, start)  # the chunks before are the originals: merge them again
            return False
        if kind == 0:
            _unmerge_f32(chunk, part, scale)
        elif kind == 1:
            _unmerge_bf16(chunk, part, scale)
        else:
            _unmerge_f16(chunk, part, scale)
        if start & (BLOCK - 1) == 0:
            end = p + counts[start >> 16]
        p, e = _apply_chunk(bits, kind, start, stop, p, end, offsets, steps, e, escape_index, escape_bits)
    return True
