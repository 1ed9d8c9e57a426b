"""The Gluon walk gather's inline PTX, run on the CPU by a small emulator of the PTX it uses.

Gluon kernels cannot run without a GPU, so the asm strings that decode_gluon.py's constexpr
functions produce (_walk_asm and its table of run starts _run_starts_asm, _lds_words_asm,
_cp_async_zfill_asm, _cp_async_asm, and the scatter's
row step _row_words_asm, stores _scatter_asm and masked ldmatrix _ldmatrix_asm) are executed here
statement by statement on a shared-memory byte array and a bounds-checked global byte array. The
inputs each instance gets are built as decode_gluon._gather_walk / _stage_rows build them (a
Python copy of that arithmetic); the outputs are compared with a numpy expansion of the packed
rows (kept values at their channels, zeros elsewhere). The kernel itself is tested on the GPU
(tests/test_decode.py with MUSTAFAR_TEST_DEVICE=cuda)."""
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mustafar_triton.kernels import decode_gluon as dg
from mustafar_triton.kernels.decode_gluon_launch import ZERO_SLOT_BYTES, run_start_pitch, staged_row_pitch

MT_DSTAGE = 0x400          # the shared address of mt_dstage (as on sm_90: after 1 KB reserved)
MT_ZERO = 0x300            # the shared address of the walks' zero slot mt_zero (_stage_decl)
GLOBAL_BASE = 0x7f0000000  # the global address of the tensor's first byte
M32 = (1 << 32) - 1


def _fn(f):
    return getattr(f, "fn", f)  # gluon.constexpr_function wraps the Python function


def _split_operands(text):
    ops, depth, cur = [], 0, ""
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            ops.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        ops.append(cur.strip())
    return ops


class Ptx:
    """Runs one inline-asm string: args are the $n operands (outputs first, filled in by run)."""

    def __init__(self, shared, glob=None, ldmatrix=None, zero_slot=None):
        self.shared = shared      # np.uint8 array: offset 0 is shared address MT_DSTAGE
        # mt_zero's bytes (zeros, as _stage_decl leaves them, unless a test poisons them)
        self.zero_slot = np.zeros(ZERO_SLOT_BYTES, np.uint8) if zero_slot is None else zero_slot
        self.glob = glob          # np.uint8 array at GLOBAL_BASE (bounds-checked), or None
        self.global_reads = []    # (address, bytes) of every global access, and src-size-0 addresses
        self.ldmatrix = ldmatrix  # (trans, address) -> this lane's 4 registers (a warp-wide model)
        self.stores = []          # (shared offset, bytes) of every 2-byte store

    def run(self, asm, n_out, inputs):
        body = asm.strip()
        if body.startswith("{"):
            assert body.endswith("}"), body
            body = body[1:-1]
        args = [None] * n_out + [int(x) for x in inputs]
        regs, preds = {}, {}

        def val(op):
            op = op.strip()
            if op.startswith("$"):
                v = args[int(op[1:])]
                assert v is not None, f"read of output {op} before it is written"
                return v
            if op == "mt_dstage":
                return MT_DSTAGE
            if op == "mt_zero":
                return MT_ZERO
            if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", op):
                return int(op, 0)
            assert op in regs, f"read of unset register {op}"
            return regs[op]

        def put(op, v, bits=32):
            v &= (1 << bits) - 1
            if op.startswith("$"):
                args[int(op[1:])] = v
            else:
                regs[op] = v

        def addr(op):
            m = re.fullmatch(r"\[\s*([^\]+]+?)\s*(?:\+\s*(-?\d+))?\s*\]", op)
            assert m, op
            return val(m.group(1)) + int(m.group(2) or 0)

        def lds(a, nbytes):
            if MT_ZERO <= a < MT_ZERO + ZERO_SLOT_BYTES:
                assert a + nbytes <= MT_ZERO + ZERO_SLOT_BYTES and a % nbytes == 0, hex(a)
                return int.from_bytes(self.zero_slot[a - MT_ZERO:a - MT_ZERO + nbytes].tobytes(), "little")
            off = a - MT_DSTAGE
            assert 0 <= off and off + nbytes <= len(self.shared) and a % nbytes == 0, hex(a)
            return int.from_bytes(self.shared[off:off + nbytes].tobytes(), "little")

        def signed(v):
            v &= M32
            return v - (1 << 32) if v >> 31 else v

        for stmt in body.split(";"):
            stmt = stmt.strip()
            if not stmt or stmt.startswith(".reg"):
                continue
            guard = None
            m = re.match(r"@(!?)(\w+)\s+(.*)", stmt)
            if m:
                guard = (m.group(1) == "!", m.group(2))
                stmt = m.group(3)
            opcode, _, rest = stmt.partition(" ")
            ops = _split_operands(rest)
            if guard is not None and preds[guard[1]] == guard[0]:
                continue
            parts = opcode.split(".")
            if parts[0] == "mov":
                put(ops[0], val(ops[1]), 64 if parts[1].endswith("64") else 32)
            elif parts[0] == "add":
                put(ops[0], val(ops[1]) + val(ops[2]), 64 if parts[1].endswith("64") else 32)
            elif opcode == "cvt.u64.u32":
                put(ops[0], val(ops[1]) & M32, 64)
            elif parts[0] == "sub":
                put(ops[0], val(ops[1]) - val(ops[2]))
            elif parts[0] == "and":
                put(ops[0], val(ops[1]) & val(ops[2]))
            elif parts[0] == "xor":
                put(ops[0], val(ops[1]) ^ val(ops[2]))
            elif opcode in ("shl.b32", "shr.b32"):  # shifts of 32 or more give 0 (PTX clamps the amount)
                v, n = val(ops[1]) & M32, min(val(ops[2]) & M32, 32)
                put(ops[0], v << n if opcode == "shl.b32" else v >> n)
            elif opcode == "brev.b32":
                put(ops[0], int(format(val(ops[1]) & M32, "032b")[::-1], 2))
            elif opcode in ("bfind.u32", "bfind.shiftamt.u32"):  # no bit set: 0xffffffff
                v = val(ops[1]) & M32
                put(ops[0], M32 if v == 0 else (v.bit_length() - 1 if opcode == "bfind.u32" else 32 - v.bit_length()))
            elif parts[0] == "popc":
                put(ops[0], bin(val(ops[1]) & M32).count("1"))
            elif opcode == "mad.lo.u32":
                put(ops[0], val(ops[1]) * val(ops[2]) + val(ops[3]))
            elif parts[0] == "setp":
                cmp, typ = parts[1], parts[-1]
                a, b = val(ops[1]), val(ops[2])
                if typ == "s32":
                    a, b = signed(a), signed(b)
                else:
                    assert typ == "u32" or cmp in ("eq", "ne"), opcode
                    a, b = a & M32, b & M32
                r = {"ne": a != b, "eq": a == b, "lt": a < b, "gt": a > b, "le": a <= b, "ge": a >= b}[cmp]
                if len(parts) == 4:  # setp.cmp.bool.type p, a, b, c
                    assert parts[2] == "and", opcode
                    r = r and preds[ops[3]]
                preds[ops[0]] = r
            elif parts[0] == "selp":
                put(ops[0], val(ops[1]) if preds[ops[3]] else val(ops[2]), 64 if parts[1] == "b64" else 32)
            elif opcode == "prmt.b32":  # default mode: nibble bit 3 replicates the byte's sign bit
                src = val(ops[1]) & M32 | (val(ops[2]) & M32) << 32
                sel = val(ops[3])
                out = 0
                for i in range(4):
                    nib = (sel >> (4 * i)) & 0xF
                    byte = (src >> (8 * (nib & 7))) & 0xFF
                    out |= (0xFF if byte >> 7 else 0) << (8 * i) if nib & 8 else byte << (8 * i)
                put(ops[0], out)
            elif opcode == "bar.warp.sync":  # one lane at a time here: nothing to order
                pass
            elif parts[0] == "ldmatrix":
                a = addr(ops[1])
                dsts = [d.strip() for d in ops[0].strip("{}").split(",")]
                for d, v in zip(dsts, self.ldmatrix("trans" in parts, a), strict=True):
                    put(d, v)
            elif opcode == "st.shared.u16":
                a = addr(ops[0])
                off = a - MT_DSTAGE
                assert 0 <= off and off + 2 <= len(self.shared) and a % 2 == 0, hex(a)
                self.shared[off:off + 2] = np.frombuffer((val(ops[1]) & 0xFFFF).to_bytes(2, "little"), np.uint8)
                self.stores.append((off, 2))
            elif parts[:2] == ["st", "shared"]:
                a = addr(ops[0])
                srcs = [x.strip() for x in ops[1].strip("{}").split(",")]
                assert parts[-1] == "b32" and a % (4 * len(srcs)) == 0, opcode
                if a == MT_ZERO:
                    assert len(srcs) == 4, "mt_zero is written as one 16-byte store"
                    self.zero_slot[:] = np.frombuffer(b"".join((val(x) & M32).to_bytes(4, "little") for x in srcs), np.uint8)
                    continue
                for i, x in enumerate(srcs):
                    off = a + 4 * i - MT_DSTAGE
                    assert 0 <= off and off + 4 <= len(self.shared)
                    self.shared[off:off + 4] = np.frombuffer((val(x) & M32).to_bytes(4, "little"), np.uint8)
            elif opcode == "ld.shared.u16":
                put(ops[0], lds(addr(ops[1]), 2))
            elif opcode == "ld.shared.u8":
                put(ops[0], lds(addr(ops[1]), 1))
            elif opcode == "cvt.u16.u32":
                put(ops[0], val(ops[1]) & 0xFFFF)
            elif opcode == "cvt.rn.f16x2.e4m3x2":  # byte i of the 16-bit source -> half i (exact)
                two = torch.tensor([val(ops[1]) & 0xFF, (val(ops[1]) >> 8) & 0xFF], dtype=torch.uint8)
                halves = two.view(torch.float8_e4m3fn).to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
                put(ops[0], int(halves[0]) | int(halves[1]) << 16)
            elif parts[:2] == ["ld", "shared"]:
                a = addr(ops[1])
                dsts = [d.strip() for d in ops[0].strip("{}").split(",")]
                assert parts[-1] in ("u32", "b32") and len(parts) == (4 if len(dsts) > 1 else 3), opcode
                assert a % (4 * len(dsts)) == 0, "misaligned vector load"
                for i, d in enumerate(dsts):
                    put(d, lds(a + 4 * i, 4))
            elif parts[:2] == ["cp", "async"] and len(parts) == 5:
                dst, src, size = addr(ops[0]), addr(ops[1]), int(ops[2])
                src_size = val(ops[3]) if len(ops) > 3 else size
                assert size in (4, 8, 16) and 0 <= src_size <= size and dst % size == 0 and src % size == 0
                off = src - GLOBAL_BASE
                # every address handed to cp.async is inside the tensor, even with src-size 0
                assert self.glob is not None and 0 <= off and off + size <= len(self.glob), \
                    f"cp.async source {hex(src)} outside the tensor"
                self.global_reads.append((src, src_size))
                data = np.zeros(size, np.uint8)
                data[:src_size] = self.glob[off:off + src_size]
                d = dst - MT_DSTAGE
                assert 0 <= d and d + size <= len(self.shared)
                self.shared[d:d + size] = data
            else:
                raise AssertionError(f"PTX not emulated: {stmt}")
        outs = args[:n_out]
        assert all(o is not None for o in outs), "an output was never written"
        return outs


# ---------------------------------------------------------------------------------------------
# the walk: _gather_walk's per-run inputs, _walk_asm's outputs
# ---------------------------------------------------------------------------------------------

def popc(x):
    return bin(x & M32).count("1")


def row_words(keep):
    """The bitmap words [D/32] (uint32) of a row whose kept channels are the bool mask `keep`
    [D]: channel 32 j + i is bit i of word j."""
    return np.packbits(keep.reshape(-1, 32)[:, ::-1].astype(np.uint8), axis=1).view(">u4").reshape(-1).astype(np.uint32)


def kept_channels(words):
    """The bool mask [D] of the channels a row's bitmap words keep (row_words' inverse)."""
    return np.array([(int(w) >> i) & 1 for w in words for i in range(32)], bool)


def random_rows(rng, n, head_dim, capacity):
    """n tokens' bitmap words [n, D/32] (uint32) and value rows [n, capacity] (uint16 bit patterns):
    random densities, plus tokens with no bits, with all bits of some bytes, at exactly capacity,
    and malformed ones (more bits than capacity)."""
    words = np.zeros((n, head_dim // 32), np.uint32)
    for t in range(n):
        kind = t % 6
        if kind == 0:
            keep = np.zeros(head_dim, bool)                                   # empty
        elif kind == 1:
            keep = np.zeros(head_dim, bool)
            keep[:min(capacity, head_dim)] = True                             # full bytes from channel 0
        elif kind == 2:
            keep = np.zeros(head_dim, bool)
            keep[rng.choice(head_dim, capacity, replace=False)] = True        # exactly capacity
        elif kind == 3:
            keep = np.zeros(head_dim, bool)
            keep[rng.choice(head_dim, capacity + 1 + rng.integers(8), replace=False)] = True  # malformed
        else:
            keep = np.zeros(head_dim, bool)
            keep[rng.choice(head_dim, rng.integers(1, capacity + 1), replace=False)] = True
            if kind == 5:  # one byte with all 8 bits, the others trimmed back to capacity
                b = rng.integers(head_dim // 8)
                keep[8 * b:8 * b + 8] = True
                others = np.flatnonzero(keep)
                others = others[(others < 8 * b) | (others >= 8 * b + 8)]
                keep[rng.permutation(others)[:max(0, keep.sum() - capacity)]] = False
        words[t] = row_words(keep)
    values = rng.integers(1, 1 << 16, size=(n, capacity), dtype=np.uint32).astype(np.uint16)
    return words, values


def dense_reference(words, values, capacity):
    """[n, D] uint16: kept values at their channels (increasing), zeros elsewhere; a token with more
    bits than capacity (malformed) or a zeroed bitmap row reads as zeros."""
    n, nw = words.shape
    out = np.zeros((n, 32 * nw), np.uint16)
    for t in range(n):
        chans = np.flatnonzero(kept_channels(words[t]))
        if len(chans) <= capacity:
            out[t, chans] = values[t, :len(chans)]
    return out


ROW_KINDS = ("random", "capacity", "malformed", "run", "one word", "empty")


def pattern_rows(rng, kinds, head_dim, capacity):
    """16 rows (bitmap words, values) of the given kinds: random counts up to capacity, exactly
    capacity, more than capacity (malformed), a run of consecutive channels, the first channels
    of one word, none."""
    words = np.zeros((16, head_dim // 32), np.uint32)
    for t, kind in enumerate(kinds):
        keep = np.zeros(head_dim, bool)
        if kind == "random":
            keep[rng.choice(head_dim, rng.integers(0, capacity + 1), replace=False)] = True
        elif kind == "capacity":
            keep[rng.choice(head_dim, capacity, replace=False)] = True
        elif kind == "malformed" and capacity < head_dim:
            keep[rng.choice(head_dim, rng.integers(capacity + 1, head_dim + 1), replace=False)] = True
        elif kind == "run":
            start = rng.integers(0, head_dim)
            keep[start:start + rng.integers(1, capacity + 1)] = True
        elif kind == "one word":
            w = rng.integers(0, head_dim // 32)
            keep[32 * w:32 * w + min(capacity, 32)] = True
        words[t] = row_words(keep)
    values = rng.integers(1, 1 << 16, size=(16, capacity), dtype=np.uint32).astype(np.uint16)
    return words, values


def run_starts(words, capacity):
    """The staged bitmap rows [n, D/32] and their run-start table [n, pitch] (uint8) as one lane per
    row leaves them after decode_gluon._run_starts_asm (emulated): a malformed row (more bits than
    capacity) zeroed in place, and byte j of a row the kept count before its word j."""
    n, nw = words.shape
    pitch, table_pitch = staged_row_pitch(4 * nw), run_start_pitch(32 * nw)
    table = n * pitch
    shared = np.full(table + n * table_pitch, 0xEE, np.uint8)  # stale bytes in the table
    for t in range(n):
        shared[t * pitch:t * pitch + 4 * nw] = words[t].view(np.uint8)
    asm = _fn(dg._run_starts_asm)(nw)
    for t in range(n):
        Ptx(shared).run(asm, 1, [t * pitch, capacity, table + t * table_pitch])
    staged = np.stack([shared[t * pitch:t * pitch + 4 * nw].view(np.uint32) for t in range(n)])
    return staged, shared[table:].reshape(n, table_pitch)


def walk_inputs(row_words, row_starts, head_dim, k_side, run, row_addr, value_bytes=2, span=None, first=0):
    """_gather_walk's per-token inputs of one run of the channels [first, first + span) (all of
    them, or a half for walk_halves), from the row's staged words and run-start table row
    (run_starts): the shared address of the run's first slot (value_bytes per slot) and, per byte of
    the run, the word holding it (byte b at bits 8 (b % 4) ..)."""
    span = span or head_dim
    nb = span // 32 if k_side else span // 64
    w = [int(x) for x in row_words]
    w0 = (run * (nb // 4) if nb >= 4 else run // (4 // nb)) + first // 32
    before = int(row_starts[w0])
    own = w[w0]
    if nb > 4:
        own_b = w[w0 + 1]
        bits = [own if b < 4 else own_b for b in range(nb)]
        slot = before
    elif nb == 4:
        bits = [own] * nb
        slot = before
    else:
        shift = (run % (4 // nb)) * (8 * nb)
        slot = before + popc(own & ((1 << shift) - 1))
        s_own = own - (1 << 32) if own >> 31 else own      # int32: an arithmetic shift
        bits = [(s_own >> shift) & M32] * nb
    return row_addr + slot * value_bytes, bits


def run_walk(head_dim, capacity, k_side, words, values, asm_fn=None, span=None, first=0, zero_slot=None):
    """All runs of all tokens through _walk_asm, as one lane's instances see them: returns
    [n, span] uint16 (the channels first + [r * 8 nb ..] of run r of token t at [t, r * 8 nb ..];
    span: all D, or a half for walk_halves). values uint8: fp8 slots (the walk's one-byte form,
    widened to fp16 bits). zero_slot: mt_zero's 16 bytes (zeros unless given)."""
    n = len(words)
    span = span or head_dim
    nb = span // 32 if k_side else span // 64
    runs = 4 if k_side else 8
    value_bytes = values.itemsize
    pitch = staged_row_pitch(value_bytes * capacity)
    stage_off = 48                                   # some stage offset in mt_dstage
    shared = np.full(stage_off + n * pitch + 64, 0xEE, np.uint8)  # stale bytes everywhere
    for t in range(n):
        off = stage_off + t * pitch
        shared[off:off + value_bytes * capacity] = values[t].view(np.uint8)
    asm = (asm_fn or _fn(dg._walk_asm))(not k_side, nb, value_bytes)
    constraints = _fn(dg._walk_constraints)(not k_side, nb)
    n_out = constraints.count("=r")
    n_el = 8 * nb                                    # elements per token per instance
    emu = Ptx(shared, zero_slot=zero_slot)
    rng = np.random.default_rng(0)
    out = np.zeros((n, span), np.uint16)
    pairs = [(t,) for t in range(n)] if k_side else [(t, t + 1) for t in range(0, n - 1, 2)]
    staged, starts = run_starts(words, capacity)
    for toks in pairs:
        for r in range(runs):
            per_tok = [walk_inputs(staged[t], starts[t], head_dim, k_side, r, MT_DSTAGE + stage_off + t * pitch,
                                   value_bytes, span, first) for t in toks]
            s = len(toks)
            addrs = [0] * (s * n_el)
            bits = [0] * (s * n_el)
            # element order: token (pairs), bit, byte. The kernel broadcasts, but _walk_asm's
            # contract names the elements it reads (a token's first element's address, each
            # byte's first element's bits): the others get garbage here, to hold it to that.
            for st, (a, bw) in enumerate(per_tok):
                for j in range(n_el):
                    byte_start = j % 8 == 0
                    addrs[st + s * j] = a - MT_DSTAGE if j == 0 else int(rng.integers(1 << 32))  # asm adds mt_dstage
                    bits[st + s * j] = bw[j // 8] if byte_start else int(rng.integers(1 << 32))
            assert constraints.count("r") - n_out == 2 * s * n_el
            regs = emu.run(asm, n_out, addrs + bits)
            elems = []
            for reg in regs:
                elems += [reg & 0xFFFF, reg >> 16]
            for st, t in enumerate(toks):
                for j in range(n_el):
                    out[t, r * n_el + j] = elems[st + s * j]
    return out


@pytest.mark.parametrize("k_side", [True, False], ids=["K", "V"])
@pytest.mark.parametrize("head_dim,capacity", [(64, 24), (128, 40), (128, 64), (256, 80)])
def test_walk_asm_expands_rows_exactly(head_dim, capacity, k_side):
    rng = np.random.default_rng(head_dim * 1000 + capacity + k_side)
    words, values = random_rows(rng, 12, head_dim, capacity)
    got = run_walk(head_dim, capacity, k_side, words, values)
    want = dense_reference(words, values, capacity)
    assert (got == want).all(), np.argwhere(got != want)[:8]


@pytest.mark.parametrize("fp8", [False, True], ids=["fp16", "fp8"])
@pytest.mark.parametrize("k_side", [True, False], ids=["K", "V"])
@pytest.mark.parametrize("head_dim,capacity", [(128, 40), (128, 64), (128, 80), (256, 80)])
def test_walk_halves_expand_their_channels_exactly(head_dim, capacity, k_side, fp8):
    """walk_halves gathers each half of the channels as a walk of D / 2 whose runs start at the
    half's first bitmap word (_gather_walk's FIRST): each half expands exactly, fp8 slots too."""
    rng = np.random.default_rng(head_dim * 1000 + capacity + k_side + 7)
    words, values = random_rows(rng, 12, head_dim, capacity)
    if fp8:
        values = (values & 0xFF).astype(np.uint8)
    want = dense_reference(words, fp8_as_fp16_bits(values) if fp8 else values, capacity)
    half = head_dim // 2
    for first in (0, half):
        got = run_walk(head_dim, capacity, k_side, words, values, span=half, first=first)
        assert (got == want[:, first:first + half]).all(), (first, np.argwhere(got != want[:, first:first + half])[:8])


@given(head_dim=st.sampled_from([64, 128, 256]), cap=st.integers(1, 32), k_side=st.booleans(),
       kinds=st.lists(st.sampled_from(ROW_KINDS), min_size=16, max_size=16), seed=st.integers(0, 2**32 - 1))
def test_property_walk_asm_any_pattern(head_dim, cap, k_side, kinds, seed):
    """The walk on fuzzed rows (pattern_rows' kinds, capacities multiples of 8 up to D) expands
    every row exactly; malformed rows read as zeros."""
    capacity = 8 * min(cap, head_dim // 8)
    words, values = pattern_rows(np.random.default_rng(seed), kinds, head_dim, capacity)
    got = run_walk(head_dim, capacity, k_side, words, values)
    want = dense_reference(words, values, capacity)
    assert (got == want).all(), np.argwhere(got != want)[:8]


def fp8_as_fp16_bits(values):
    """uint8 e4m3 bytes [n, capacity] as the fp16 bit patterns (uint16) they widen to exactly."""
    return torch.from_numpy(values).view(torch.float8_e4m3fn).to(torch.float16).view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("k_side", [True, False], ids=["K", "V"])
@pytest.mark.parametrize("head_dim,capacity", [(64, 48), (128, 32), (128, 80), (256, 192)])
def test_walk_asm_widens_fp8_rows_exactly(head_dim, capacity, k_side):
    """fp8 slots (one byte each, every byte value including NaN) land as their fp16 values."""
    rng = np.random.default_rng(head_dim * 1000 + capacity + k_side + 1)
    words, values16 = random_rows(rng, 12, head_dim, capacity)
    values = (values16 & 0xFF).astype(np.uint8)
    values[1, :] = np.arange(capacity) % 256           # rows 1 and 7 keep channels [0, capacity)
    values[7, :] = (np.arange(capacity) + 128) % 256
    got = run_walk(head_dim, capacity, k_side, words, values)
    want = dense_reference(words, fp8_as_fp16_bits(values), capacity)
    assert (got == want).all(), np.argwhere(got != want)[:8]


def test_walk_asm_zeroed_rows_read_zero_whatever_the_values():
    """Rows past a tile's end are staged with zero bitmaps (stale value rows): zeros out."""
    rng = np.random.default_rng(7)
    for k_side in (True, False):
        words = np.zeros((4, 4), np.uint32)
        values = rng.integers(0, 1 << 16, size=(4, 40), dtype=np.uint32).astype(np.uint16)
        assert not run_walk(128, 40, k_side, words, values).any()


@pytest.mark.parametrize("value_bytes", [2, 1], ids=["fp16", "fp8"])
def test_walk_asm_reads_unkept_channels_from_the_zero_slot(value_bytes):
    """A channel the row does not keep reads mt_zero (its first value_bytes bytes), kept ones
    their slots: with the zero slot poisoned, exactly the unkept channels show the poison."""
    rng = np.random.default_rng(11)
    words, values = random_rows(rng, 8, 128, 40)
    if value_bytes == 1:
        values = (values & 0xFF).astype(np.uint8)
    poison = np.frombuffer(bytes([0x38, 0x3C] * (ZERO_SLOT_BYTES // 2)), np.uint8).copy()   # fp8 0x38 -> fp16 1.0
    kept = dense_reference(words, np.ones_like(values, dtype=np.uint16), 40) != 0
    want = dense_reference(words, fp8_as_fp16_bits(values) if value_bytes == 1 else values, 40)
    want[~kept] = 0x3C00 if value_bytes == 1 else 0x3C38
    for k_side in (True, False):
        got = run_walk(128, 40, k_side, words, values, zero_slot=poison)
        assert (got == want).all(), np.argwhere(got != want)[:8]


def test_stage_decl_zeroes_the_walks_zero_slot():
    """_stage_decl(..., zero_slot=True) declares mt_zero and zeroes its 16 bytes; without it, the
    declaration alone (the scatter's)."""
    asm = _fn(dg._stage_decl)(1024, True)
    assert ".shared .align 16 .b8 mt_zero[16];" in asm and "mt_zero" not in _fn(dg._stage_decl)(1024)
    # the statements after the declarations, the inner block's braces dropped (the emulator runs
    # one level of braces)
    body = ";".join(x for x in asm.split(";") if ".shared .align" not in x)
    body = body.replace("{ .reg", ".reg").replace("} mov", "mov")
    emu = Ptx(np.zeros(16, np.uint8), zero_slot=np.full(ZERO_SLOT_BYTES, 0xA5, np.uint8))
    assert emu.run(body, 1, [5]) == [5]
    assert not emu.zero_slot.any()


def test_emulator_catches_a_broken_walk():
    """The check above fails for a walk whose slot step is wrong (guards the emulator itself)."""
    def broken(pairs, nbytes, value_bytes):
        return _fn(dg._walk_asm)(pairs, nbytes, value_bytes).replace("add.u32 a0, a0, 2;", "add.u32 a0, a0, 4;", 1)
    rng = np.random.default_rng(3)
    words, values = random_rows(rng, 6, 128, 40)
    assert (run_walk(128, 40, True, words, values, broken) != dense_reference(words, values, 40)).any()


@pytest.mark.parametrize("head_dim,capacity", [(64, 24), (128, 40), (128, 120), (256, 80)])
def test_run_starts_asm_counts_rows_and_zeroes_malformed_ones(head_dim, capacity):
    """Each lane's row of the run-start table holds the kept count before each bitmap word; a row
    with more bits than capacity is zeroed in place, the others are left as staged."""
    words, _ = random_rows(np.random.default_rng(head_dim + capacity), 12, head_dim, capacity)
    staged, starts = run_starts(words, capacity)
    seen_malformed = False
    for t in range(len(words)):
        counts = [popc(int(x)) for x in words[t]]
        malformed = sum(counts) > capacity
        seen_malformed = seen_malformed or malformed
        assert (staged[t] == (0 if malformed else words[t])).all()
        if not malformed:  # a zeroed row has no runs: its table row is never read
            assert list(starts[t, :len(counts)]) == list(np.cumsum([0] + counts[:-1]))
    assert seen_malformed


@pytest.mark.parametrize("head_dim,span", [(64, 64), (128, 128), (256, 256), (128, 64), (256, 128)])
def test_walk_output_rows_reordered_to_channel_order(head_dim, span):
    """decode_gluon._walk_rows_in_channel_order's reshape [D / span, span / 16, 2, 8] and permute
    (0, 3, 1, 2) put each row of the walks' O^T (row idx holds channel _walk_channel(idx) of its
    span: the walk, or each half for walk_halves) at its channel, so the store's offsets can be a
    plain arange (the kernel's own _walk_channel, run on numpy indices)."""
    idx = np.arange(head_dim)
    chan = (idx // span) * span + dg._walk_channel.fn(idx % span, span, False)
    assert sorted(chan) == list(idx)
    moved = chan.reshape(head_dim // span, span // 16, 2, 8).transpose(0, 3, 1, 2).reshape(head_dim)
    assert (moved == idx).all()


def test_lds_words_asm():
    shared = np.arange(256, dtype=np.uint8)
    for n in (2, 4, 8):
        outs = Ptx(shared).run(_fn(dg._lds_words_asm)(n), n, [32])
        assert outs == [int.from_bytes(shared[32 + 4 * i:36 + 4 * i].tobytes(), "little") for i in range(n)]


# ---------------------------------------------------------------------------------------------
# staging: _stage_rows' cp.async of bitmap rows with zero-fill past the tile's end
# ---------------------------------------------------------------------------------------------

def stage_rows(glob, tile_start, c_hi, row_bytes, zfill, stage_off=16, stage_bytes=2048):
    """_stage_rows for one tile, every lane (its argument arithmetic copied): returns the stage
    bytes (0xEE where nothing was written) and the emulator (its global accesses)."""
    chunk = 16 if row_bytes % 16 == 0 else 8
    per_row = row_bytes // chunk
    nch = 16 * per_row
    pad = staged_row_pitch(row_bytes) - row_bytes
    nbytes = min(max(c_hi - tile_start, 0), 16) * row_bytes
    src = GLOBAL_BASE + tile_start * row_bytes
    shared = np.full(stage_bytes, 0xEE, np.uint8)
    emu = Ptx(shared, glob)
    for i in range(0, nch, 32):
        for lane in range(32):
            c = i + lane
            dst = stage_off + c * chunk + (c // per_row) * pad
            if zfill:
                asm = _fn(dg._cp_async_zfill_asm)(chunk, nch * chunk if nch % 32 else 0)
                emu.run(asm, 1, [src, dst, c * chunk, nbytes])
            else:
                emu.run(_fn(dg._cp_async_asm)(chunk), 1, [src + min(c, nch - 1) * chunk, dst, c * chunk, nbytes])
    return shared, emu


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("tokens,tile_start,c_hi", [(37, 32, 37), (37, 16, 37), (48, 32, 48), (20, 16, 17),
                                                     (37, 16, 30)])
def test_zero_filled_bitmap_rows(head_dim, tokens, tile_start, c_hi):
    """Rows before c_hi are copied, rows past it (inside the 16-row tile) become zeros, the row
    pads and everything past the tile keep their bytes, and no global byte outside the tensor
    is read or even addressed."""
    row_bytes = head_dim // 8
    rng = np.random.default_rng(tokens + tile_start + head_dim)
    glob = rng.integers(0, 256, size=tokens * row_bytes, dtype=np.uint8)
    pitch = staged_row_pitch(row_bytes)
    shared, emu = stage_rows(glob, tile_start, c_hi, row_bytes, True)
    for r in range(16):
        staged = shared[16 + r * pitch:16 + r * pitch + row_bytes]
        if tile_start + r < c_hi:
            assert (staged == glob[(tile_start + r) * row_bytes:(tile_start + r + 1) * row_bytes]).all(), r
        else:
            assert not staged.any(), r
        assert (shared[16 + r * pitch + row_bytes:16 + (r + 1) * pitch] == 0xEE).all(), "a pad was written"
    assert (shared[:16] == 0xEE).all() and (shared[16 + 16 * pitch:] == 0xEE).all()
    assert sum(n for _, n in emu.global_reads) == min(c_hi - tile_start, 16) * row_bytes


def test_no_staging_for_a_tile_past_the_end():
    """A tile with no token before c_hi (never gathered) stages nothing, and its source row,
    past the tensor, is never handed to cp.async."""
    glob = np.ones(32 * 16, np.uint8)
    for start in (32, 48):
        shared, emu = stage_rows(glob, start, 32, 16, True)
        assert (shared == 0xEE).all() and not emu.global_reads


def test_emulator_catches_reads_past_the_tensor(monkeypatch):
    """Without the zero-fill's clamp (each chunk at its own offset, also past c_hi), the staging of
    a tile that crosses the tensor's end would address bytes past it: the emulator refuses."""
    zfill = _fn(dg._cp_async_zfill_asm)
    monkeypatch.setattr(dg, "_cp_async_zfill_asm",
                        lambda chunk, limit: zfill(chunk, limit).replace("selp.b32 o, $3, 0, p;", "mov.b32 o, $3;"))
    with pytest.raises(AssertionError, match="outside the tensor"):
        stage_rows(np.ones(37 * 16, np.uint8), 32, 37, 16, True)


# ---------------------------------------------------------------------------------------------
# the scatter's read-back: ldmatrix of dense tiles that are never zeroed, masked by the bitmaps
# ---------------------------------------------------------------------------------------------

def dense_row(dense_off, row, head_dim):
    """decode_gluon._dense_row."""
    return dense_off + row * (2 * head_dim + 16) + 32 * (row // 8)


def ldmatrix_model(shared, lane_addrs):
    """ldmatrix.x4 as the PTX ISA defines it, for a warp whose lane l supplies the shared address
    lane_addrs[l] (lanes 8 i .. 8 i + 7: rows 0-7 of matrix i): returns f(trans, address) giving a
    lane's four registers (that lane known by its address)."""
    def half(a):
        off = a - MT_DSTAGE
        return int(shared[off]) | int(shared[off + 1]) << 8

    def regs(trans, address):
        t = lane_addrs.index(address)
        out = []
        for i in range(4):
            rows = lane_addrs[8 * i:8 * i + 8]
            if trans:  # row 2 (t % 4) (+1), column t / 4 of matrix i
                lo, hi = half(rows[2 * (t % 4)] + 2 * (t // 4)), half(rows[2 * (t % 4) + 1] + 2 * (t // 4))
            else:      # row t / 4, columns 2 (t % 4) (+1)
                lo, hi = half(rows[t // 4] + 4 * (t % 4)), half(rows[t // 4] + 4 * (t % 4) + 2)
            out.append(lo | hi << 16)
        return out
    return regs


def run_masked_ldmatrix(head_dim, words, dense, v_side):
    """The dense tile `dense` ([16, D] uint16 as the scatter left it: kept values at their
    channels, anything elsewhere) in its _dense_row rows (K rows 0-15, V rows 16-31) and the bitmap
    rows `words` staged; every lane's _ldmatrix_asm instances with the inputs that
    decode_gluon._ldmatrix_operand computes (a Python copy of its arithmetic). Returns the tile
    read back, [16, D] (V: transposed back from V^T)."""
    nw, nb = head_dim // 32, head_dim // 16
    dense_off, bits_off = 0, 32 * (2 * head_dim + 16) + 128
    pitch = staged_row_pitch(4 * nw)
    shared = np.frombuffer(np.random.default_rng(5).bytes(bits_off + 16 * pitch + 64), np.uint8).copy()
    for t in range(16):
        off = dense_row(dense_off, t + (16 if v_side else 0), head_dim)
        shared[off:off + 2 * head_dim] = dense[t].view(np.uint8)
        shared[bits_off + t * pitch:bits_off + t * pitch + 4 * nw] = words[t].astype("<u4").view(np.uint8)
    asm = _fn(dg._ldmatrix_asm)(v_side)
    out = np.zeros((16, head_dim), np.uint16)
    for b in range(nb):
        addrs = []
        for lane in range(32):
            if v_side:
                row = 16 + lane % 8 + 8 * (lane // 16)
                addrs.append(MT_DSTAGE + dense_row(dense_off, row, head_dim) + 32 * b + 16 * ((lane // 8) % 2))
            else:
                row = lane % 8 + 8 * ((lane // 8) % 2)
                addrs.append(MT_DSTAGE + dense_row(dense_off, row, head_dim) + 32 * b + 16 * (lane // 16))
        emu = Ptx(shared, ldmatrix=ldmatrix_model(shared, addrs))
        for lane in range(32):
            r, q = lane // 4, lane % 4

            def word(tok, shift):
                return (int(words[tok, b // 2]) << shift) & M32
            if v_side:
                masks = [word(2 * q + d, 7 - r) for d in (0, 1, 8, 9)]
            else:
                masks = [word(r, 7 - 2 * q), word(r, 6 - 2 * q), word(r + 8, 7 - 2 * q), word(r + 8, 6 - 2 * q)]
            sel0 = 0xCC88 + 0x2222 * (b % 2)
            inputs = []
            for x in [addrs[lane] - MT_DSTAGE] + masks + [sel0, sel0 + 0x1111]:
                inputs += [x] + [0xDEADBEEF] * 7   # pack 8: only each input's first element is read
            regs = emu.run(asm, 4, inputs)
            for k, reg in enumerate(regs):
                for e0, h in enumerate((reg & 0xFFFF, reg >> 16)):
                    if v_side:  # channel 16 b + 8 (k % 2) + r, token 8 (k // 2) + 2 q + e0
                        out[8 * (k // 2) + 2 * q + e0, 16 * b + 8 * (k % 2) + r] = h
                    else:       # token r + 8 (k % 2), channel 16 b + 8 (k // 2) + 2 q + e0
                        out[r + 8 * (k % 2), 16 * b + 8 * (k // 2) + 2 * q + e0] = h
    return out


def scattered_tile(rng, head_dim, capacity, kinds=None):
    """16 staged bitmap rows as the scatter leaves them (a row past the tile's end zeroed, the
    malformed rows' bitmaps zeroed by _row_words_asm), the dense tile it leaves (kept values at
    their channels, random stale bytes elsewhere, NaN where row 0 keeps nothing) and the tile the
    read-back must give: returns (words, dense, want). The rows: random_rows', or pattern_rows'
    of the given kinds."""
    words, values = random_rows(rng, 16, head_dim, capacity) if kinds is None else \
        pattern_rows(rng, kinds, head_dim, capacity)
    words[3] = 0                                                      # a row past the tile's end
    want = dense_reference(words, values, capacity)
    for t in range(16):
        if sum(popc(int(w)) for w in words[t]) > capacity:
            words[t] = 0
    stale = rng.integers(0, 1 << 16, size=(16, head_dim), dtype=np.uint32).astype(np.uint16)
    stale[0, :8] = 0x7E00
    return words, np.where(want != 0, want, stale), want


@pytest.mark.parametrize("v_side", [False, True], ids=["K", "V"])
@pytest.mark.parametrize("head_dim,capacity", [(64, 24), (128, 16), (128, 40), (128, 64)])
def test_masked_ldmatrix_reads_kept_channels_and_zeros(head_dim, capacity, v_side):
    """Whatever the dense tile holds at a channel the bitmap does not keep (the scatter's stores
    of earlier tiles, NaN patterns: random bytes here), it reads as zero; kept channels read their
    value, at their token and channel of the mma operand."""
    words, dense, want = scattered_tile(np.random.default_rng(head_dim + capacity + 1000 * v_side), head_dim,
                                        capacity)
    got = run_masked_ldmatrix(head_dim, words, dense, v_side)
    assert (got == want).all(), np.argwhere(got != want)[:8]


@given(head_dim=st.sampled_from([64, 128]), cap=st.integers(1, 16), v_side=st.booleans(),
       kinds=st.lists(st.sampled_from(ROW_KINDS), min_size=16, max_size=16), seed=st.integers(0, 2**32 - 1))
def test_property_masked_ldmatrix_any_pattern(head_dim, cap, v_side, kinds, seed):
    """The masked read-back on fuzzed rows: kept channels read their value, all others zero."""
    words, dense, want = scattered_tile(np.random.default_rng(seed), head_dim, 8 * min(cap, head_dim // 8), kinds)
    got = run_masked_ldmatrix(head_dim, words, dense, v_side)
    assert (got == want).all(), np.argwhere(got != want)[:8]


def test_emulator_catches_a_wrong_mask_selector(monkeypatch):
    """The check above fails when a register takes the mask of the other channel byte."""
    words, dense, want = scattered_tile(np.random.default_rng(11), 128, 40)
    real = _fn(dg._ldmatrix_asm)
    monkeypatch.setattr(dg, "_ldmatrix_asm", lambda trans: real(trans).replace("$52; and.b32 $2", "$44; and.b32 $2", 1))
    assert (run_masked_ldmatrix(128, words, dense, False) != want).any()


@pytest.mark.parametrize("num_words", [2, 4, 8])
def test_row_words_asm_zeroes_only_malformed_rows(num_words):
    """The scatter's per-row step returns the staged row's words and leaves the row as staged, or,
    for a row with more bits than its capacity, returns zeros and zeroes the row in place; nothing
    else in shared memory changes."""
    shared = np.arange(96, dtype=np.uint8)
    words = [int.from_bytes(shared[16 + 4 * i:20 + 4 * i].tobytes(), "little") for i in range(num_words)]
    kept = sum(popc(w) for w in words)
    for capacity, malformed in ((kept, False), (kept + 7, False), (kept - 1, True), (0, True)):
        shared = np.arange(96, dtype=np.uint8)
        outs = Ptx(shared).run(_fn(dg._row_words_asm)(num_words), num_words, [16, capacity])
        assert outs == ([0] * num_words if malformed else words)
        row = shared[16:16 + 4 * num_words]
        assert (row == 0).all() if malformed else (row == np.arange(16, 16 + 4 * num_words)).all()
        assert (shared[:16] == np.arange(16)).all()
        assert (shared[16 + 4 * num_words:] == np.arange(16 + 4 * num_words, 96)).all()


# ---------------------------------------------------------------------------------------------
# the scatter's stores: _scatter_asm, into dense tiles that are never zeroed
# ---------------------------------------------------------------------------------------------

def scatter_rows(rng, head_dim, capacity):
    """16 rows (bitmap words, values) as random_rows makes them, plus rows that keep exactly
    capacity // 2 rounded up (+1, -1) values (where a scatter that walks a row's two halves apart
    starts its second half, at a word boundary or not at all) and a row whose kept values all
    sit in its last word."""
    words, values = random_rows(rng, 16, head_dim, capacity)
    half = (capacity + 1) // 2
    for t, kept in zip((6, 7, 8), (half - 1, half, half + 1)):
        keep = np.zeros(head_dim, bool)
        keep[rng.choice(head_dim, max(kept, 0), replace=False)] = True
        words[t] = row_words(keep)
    words[9] = 0
    words[9, -1] = (1 << min(capacity, 32)) - 1 if capacity < 32 else M32
    if half <= 32 and capacity - half <= 32:                         # slot `half` opens word 1
        words[10] = 0
        words[10, 0] = (1 << half) - 1
        words[10, 1] = (1 << (capacity - half)) - 1
    return words, values


def run_scatter(head_dim, k_cap, v_cap, k_rows, v_rows, stage=0, asm=None):
    """Every lane's _row_words_asm and _scatter_asm instances on a shared buffer of random bytes
    laid out by scatter_offsets, with the K and V rows staged at `stage` and the inputs
    decode_gluon._scatter_tile computes (a Python copy of its arithmetic). Returns (shared before,
    shared after, the 2-byte stores of each lane's scatter)."""
    from mustafar_triton.kernels.decode_gluon_launch import scatter_offsets, stage_offsets
    nw = head_dim // 32
    v_off, kb_off, vb_off, _ = stage_offsets(head_dim, k_cap, v_cap)
    dense_off, dummy_off, queue_off, total = scatter_offsets(head_dim, k_cap, v_cap)
    shared = np.frombuffer(np.random.default_rng(head_dim + k_cap).bytes(total), np.uint8).copy()

    def value_row(is_v, t):  # the staged value row of token t (_stage_tile's layout)
        return stage + (v_off + t * staged_row_pitch(2 * v_cap) if is_v else t * staged_row_pitch(2 * k_cap))
    for side, (words, values) in enumerate((k_rows, v_rows)):
        cap = (k_cap, v_cap)[side]
        for t in range(16):
            vo = value_row(side, t)
            shared[vo:vo + 2 * cap] = values[t].astype("<u2").view(np.uint8)
            bo = stage + (vb_off if side else kb_off) + t * staged_row_pitch(4 * nw)
            shared[bo:bo + 4 * nw] = words[t].astype("<u4").view(np.uint8)
    before = shared.copy()
    asm = asm or _fn(dg._scatter_asm)(nw, max(k_cap, v_cap))
    stores = []
    for lane in range(32):
        tok, is_v = lane % 16, lane >= 16
        bo = stage + (vb_off if is_v else kb_off) + tok * staged_row_pitch(4 * nw)
        words = Ptx(shared).run(_fn(dg._row_words_asm)(nw), nw, [bo, v_cap if is_v else k_cap])
        args = words + [value_row(is_v, tok), dense_row(dense_off, lane, head_dim), queue_off + lane * 8, dummy_off]
        emu = Ptx(shared)
        emu.run(asm, 1, args)
        stores.append(emu.stores)
    return before, shared, stores


def assert_scatter_exact(head_dim, k_cap, v_cap, k_rows, v_rows, stage):
    """Runs the scatter (run_scatter) and checks it: each row's kept values land at their channels
    of its dense row; nothing else in shared memory changes except the queue and the dummy area
    (not the channels a row does not keep, which still hold an earlier tile's values, nor any other
    row, nor the staged rows but a malformed one, zeroed); rows that keep more values than their
    capacity store nothing; each lane stores once per slot of the larger capacity, into its own
    row or the dummy area."""
    from mustafar_triton.kernels.decode_gluon_launch import scatter_offsets, stage_offsets
    stage_at = stage * stage_offsets(head_dim, k_cap, v_cap)[3]
    before, after, stores = run_scatter(head_dim, k_cap, v_cap, k_rows, v_rows, stage_at)
    dense_off, dummy_off, queue_off, total = scatter_offsets(head_dim, k_cap, v_cap)
    want = before.copy()
    for lane in range(32):
        cap, (words, values) = (v_cap, v_rows) if lane >= 16 else (k_cap, k_rows)
        dense = dense_reference(words[lane % 16:lane % 16 + 1], values[lane % 16:lane % 16 + 1], cap)[0]
        row = dense_row(dense_off, lane, head_dim)
        kept = kept_channels(words[lane % 16])
        if kept.sum() <= cap:
            seg = want[row:row + 2 * head_dim].view("<u2")
            seg[kept] = dense[kept]
        else:  # _row_words_asm zeroes a malformed row's staged bitmap
            bo = stage_at + stage_offsets(head_dim, k_cap, v_cap)[2 if lane >= 16 else 1] + \
                (lane % 16) * staged_row_pitch(head_dim // 8)
            want[bo:bo + head_dim // 8] = 0
    outside = np.ones(total, bool)
    outside[dummy_off:dummy_off + 64] = False
    outside[queue_off:] = False
    assert (after[outside] == want[outside]).all(), np.flatnonzero(after[outside] != want[outside])[:8]
    for lane, lane_stores in enumerate(stores):
        row = dense_row(dense_off, lane, head_dim)
        assert all(row <= off < row + 2 * head_dim or dummy_off <= off < dummy_off + 64 for off, _ in lane_stores)
        assert len(lane_stores) == max(k_cap, v_cap)


@pytest.mark.parametrize("head_dim,k_cap,v_cap", [(64, 24, 24), (64, 8, 16), (128, 16, 16), (128, 40, 40),
                                                  (128, 24, 56), (128, 64, 64), (128, 96, 120)])
@pytest.mark.parametrize("stage", [0, 1])
def test_scatter_asm_stores_kept_values_only(head_dim, k_cap, v_cap, stage):
    """assert_scatter_exact on random_rows' patterns and the half-capacity rows of scatter_rows."""
    rng = np.random.default_rng(1000 * head_dim + 10 * k_cap + v_cap + stage)
    k_rows, v_rows = scatter_rows(rng, head_dim, k_cap), scatter_rows(rng, head_dim, v_cap)
    assert_scatter_exact(head_dim, k_cap, v_cap, k_rows, v_rows, stage)


@given(head_dim=st.sampled_from([64, 128]), caps=st.tuples(st.integers(1, 16), st.integers(1, 16)),
       kinds=st.lists(st.sampled_from(ROW_KINDS), min_size=32, max_size=32), seed=st.integers(0, 2**32 - 1),
       stage=st.integers(0, 1))
def test_property_scatter_asm_any_pattern(head_dim, caps, kinds, seed, stage):
    """assert_scatter_exact on fuzzed rows: any mix of row kinds, K and V capacities (multiples of
    8 up to D), either stage."""
    k_cap, v_cap = (8 * min(c, head_dim // 8) for c in caps)
    rng = np.random.default_rng(seed)
    k_rows, v_rows = pattern_rows(rng, kinds[:16], head_dim, k_cap), pattern_rows(rng, kinds[16:], head_dim, v_cap)
    assert_scatter_exact(head_dim, k_cap, v_cap, k_rows, v_rows, stage)


@pytest.mark.parametrize("head_dim,k_cap,v_cap", [(128, 16, 16), (128, 8, 16), (64, 16, 8), (128, 24, 24)])
def test_scatter_saves_its_stores_and_undo_zeroes_them(head_dim, k_cap, v_cap):
    """The scatter without masks (_scatter_asm with save): its dense tiles start as zeros, so after
    every lane's scatter each row holds exactly its dense expansion (zeros where the row keeps
    nothing, all zeros for rows past their capacity); the packed offsets it returns are its stores,
    in order; _undo_asm on them turns the dense tiles back into zeros and touches nothing else
    but the dummy area."""
    from mustafar_triton.kernels.decode_gluon_launch import scatter_offsets, stage_offsets
    rng = np.random.default_rng(7 * head_dim + k_cap + v_cap)
    k_rows, v_rows = scatter_rows(rng, head_dim, k_cap), scatter_rows(rng, head_dim, v_cap)
    nw, cap = head_dim // 32, max(k_cap, v_cap)
    v_off, kb_off, vb_off, _ = stage_offsets(head_dim, k_cap, v_cap)
    dense_off, dummy_off, queue_off, total = scatter_offsets(head_dim, k_cap, v_cap)
    shared = np.frombuffer(rng.bytes(total), np.uint8).copy()
    shared[dense_off:dummy_off] = 0
    rows = []
    for lane in range(32):
        tok, is_v = lane % 16, lane >= 16
        side_cap, (words, values) = (v_cap, v_rows) if is_v else (k_cap, k_rows)
        vrow = v_off + tok * staged_row_pitch(2 * v_cap) if is_v else tok * staged_row_pitch(2 * k_cap)
        shared[vrow:vrow + 2 * side_cap] = values[tok].astype("<u2").view(np.uint8)
        fits = sum(popc(int(w)) for w in words[tok]) <= side_cap
        rows.append(([int(w) if fits else 0 for w in words[tok]], vrow, fits))
    scatter = _fn(dg._scatter_asm)(nw, cap, True)
    saved = []
    for lane, (words, vrow, _) in enumerate(rows):
        emu = Ptx(shared)
        packed = emu.run(scatter, cap // 2, words + [vrow, dense_row(dense_off, lane, head_dim),
                                                     queue_off + lane * 8, dummy_off])
        offsets = [(x >> (16 * h)) & 0xFFFF for x in packed for h in (0, 1)]
        assert offsets == [off for off, _ in emu.stores], lane
        saved.append(packed)
    for lane, (_, _, fits) in enumerate(rows):
        tok, side_cap, (words, values) = lane % 16, *((v_cap, v_rows) if lane >= 16 else (k_cap, k_rows))
        want = dense_reference(words[tok:tok + 1], values[tok:tok + 1], side_cap)[0] if fits else 0
        row = dense_row(dense_off, lane, head_dim)
        assert (shared[row:row + 2 * head_dim].view("<u2") == want).all(), lane
    before_undo = shared.copy()
    undo = _fn(dg._undo_asm)(cap // 2)
    for packed in saved:
        Ptx(shared).run(undo, 1, packed)
    assert not shared[dense_off:dummy_off].any()
    untouched = np.ones(total, bool)
    untouched[dense_off:dummy_off + 64] = False
    assert (shared[untouched] == before_undo[untouched]).all()


@pytest.mark.parametrize("start,end", [(0, 512), (6144, 6144 + 8800 - 32 * 3), (16, 16 + 8800)])
def test_zero_area_asm_zeroes_exactly_its_range(start, end):
    """_zero_area_asm run by the 32 lanes zeroes mt_dstage + [start, end) and nothing else."""
    shared = np.frombuffer(np.random.default_rng(end).bytes(end + 1024), np.uint8).copy()
    shared[shared == 0] = 1
    before = shared.copy()
    asm = _fn(dg._zero_area_asm)(start, end)
    for lane in range(32):
        Ptx(shared).run(asm, 1, [lane])
    assert not shared[start:end].any()
    assert (shared[:start] == before[:start]).all() and (shared[end:] == before[end:]).all()


def test_emulator_catches_a_broken_scatter():
    """The check above fails when one of the stores lands a channel off."""
    rng = np.random.default_rng(3)
    k_rows, v_rows = scatter_rows(rng, 128, 40), scatter_rows(rng, 128, 40)
    good = run_scatter(128, 40, 40, k_rows, v_rows)[1]
    asm = _fn(dg._scatter_asm)(4, 40)
    broken = re.sub(r"st\.shared\.u16 \[(\w+)\]", r"st.shared.u16 [\1+2]", asm, count=3)
    assert broken != asm
    assert (run_scatter(128, 40, 40, k_rows, v_rows, asm=broken)[1] != good).any()
