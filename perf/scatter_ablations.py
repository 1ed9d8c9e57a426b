"""Where the scatter gather's time goes (issue 18): copies of decode_gluon.py with one part of
the scatter removed or made free, each timed beside main's scatter by perf/decode_gathers.py
(--baseline FILE --baseline-gathers scatter). The copies compute WRONG attention (their diff
column says by how much); only their times mean something: the time a part costs is main's time
minus its copy's, a ceiling for any lever that makes that part cheaper.

    python perf/scatter_ablations.py --out-dir .gen            # writes .gen/scatter_<name>.py
    python perf/decode_gathers.py --gathers scatter --baseline .gen/scatter_conflict_free.py \
        --baseline-gathers scatter --shapes 16x16384 --sparsities 0.7,0.8,0.9

The copies (each one edit of decode_gluon.py's PTX generators, asserted to apply exactly once):
  conflict_free  every kept value's 2-byte store goes to a word of its lane's own bank (32 lanes,
                 32 banks): the stores without bank conflicts (main's measure 3.5-way on average),
                 one instruction more per value than main;
  stores_as_adds no stores of kept values: each becomes an integer multiply-add (the same issue
                 slots, no shared-memory traffic);
  no_queue_loads no load of the next bitmap word at a hand-over (main issues one predicated LDS
                 per kept value and warp; its address add dies with it: 2 instructions per value);
  no_masks       ldmatrix registers used unmasked (the bitmap words are still read; the prmt
                 and and per register, and their shifts, are gone);
  no_value_loop  no per-value loop at all: staging, queue set-up, ldmatrix, masks, mma and
                 softmax only (the scatter's fixed cost per tile).
The ablations edit the masked scatter (the one that runs unless decode_gluon_launch.scatter_undoes).
Two copies time a FORMAT that does not exist yet (issue 18: a uint8 channel index per kept value,
which at capacity <= 16 of D=128 costs no more bytes than the bitmap): the scatter takes the
channel of its r-th value from a byte (masked to D - 1, as a decoder of untrusted indices must)
instead of finding it with bfind over a queue of words: prmt, and, mad, store per value, no
queue. The byte is the value's own low byte, so the channels spread over the row like random
kept channels (a76b174 took byte r of the staged bitmap row, whose bytes at sparsity 0.9 are
mostly 0 or one bit: channels 0, 1, 2, 4, ..., more bank conflicts; its undone copy measured
slower for that reason too, perf/NOTES.md 2026-12-06 late). Capacities <= 16 at D=128:
  index_channels       with main's masks (they read the real bitmap: a format holding both);
  index_channels_undo  with the stores undone instead (a format of indices only, no bitmap).
Two more copies are not ablations (both compute right attention): undo_never / undo_always force
the choice between masking the dense tiles and undoing the stores (decode_gluon_launch.
scatter_undoes) either way, to time the policy against both.
"""
from __future__ import annotations

import argparse
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "mustafar_triton" / "kernels" / "decode_gluon.py"

STORE = '"bfind.shiftamt.u32 p, cur; mad.lo.u32 a, p, 2, base; st.shared.u16 [a], %s;" % val'
LOOP = "    for r in range(capacity):\n        val = "
MASK = '"prmt.b32 m, %s, %s, %s; and.b32 $%d, r%d, m;" % (srcs[k] + (k, k))'
SETUP = '"mov.u32 t, mt_dstage; add.u32 q, t, %s; mov.u32 hb, 0x7fffffff;" % queue'
QUEUE_LOAD = '" @!ps ld.shared.v2.b32 {nw, nb}, [q]; @!ps add.u32 q, q, 256;"'
END = '"}" if save else "mov.b32 $0, 0; }"'
IMPORTED = "                                  scatter_undoes, stage_offsets, staged_row_pitch)\n"
UNDOES = "\n\n@gluon.constexpr_function\ndef scatter_undoes(head_dim, k_capacity, v_capacity):\n    return %s\n"
DECL = '"{ .reg .pred pz, ps; .reg .b32 t, q, b, x, cur, base, nw, nb, p, m, a, hb, o, v<%d>;" % nvals'

ABLATIONS = {
    # lb: the first 128-byte line at or after the lane's dense row, plus 4 x lane (bank = lane); the
    # store's address keeps main's mad and adds one lop3 ((a & 2) | lb: the same word of the bank)
    "conflict_free": [
        (DECL, DECL.replace("o, v<%d>", "o, lb, v<%d>")),
        (SETUP, SETUP + ', "add.u32 a, t, %s; add.u32 a, a, 127; and.b32 a, a, 0xffffff80; mov.u32 lb, %%laneid;'
                        ' mad.lo.u32 lb, lb, 4, a;" % drow'),
        (STORE, '"bfind.shiftamt.u32 p, cur; mad.lo.u32 a, p, 2, base; and.b32 a, a, 2; or.b32 a, a, lb;'
                ' st.shared.u16 [a], %s;" % val'),
    ],
    # each store becomes one integer multiply-add of its address and value into a register that is
    # stored once at the end (so that nothing is dead): the loop's issue slots stay, its stores go
    "stores_as_adds": [
        (DECL, DECL.replace("o, v<%d>", "o, sink, v<%d>")),
        (SETUP, SETUP + ', "mov.u32 sink, 0;"'),
        (STORE, '"bfind.shiftamt.u32 p, cur; mad.lo.u32 a, p, 2, base; mad.lo.u32 sink, a, %s, sink;" % val'),
        (END, '"}" if save else "add.u32 b, t, %s; st.shared.u32 [b], sink; mov.b32 $0, 0; }" % dummy'),
    ],
    # the predicated queue load of each value's hand-over (one LDS per value and warp) removed
    "no_queue_loads": [(QUEUE_LOAD, '" @!ps add.u32 q, q, 256;"')],
    "no_masks": [(MASK, '"mov.b32 $%d, r%d;" % (k, k)')],
    "no_value_loop": [(LOOP, "    for r in range(0):\n        val = ")],
    # not ablations (both compute right): the choice between masking the tiles and undoing the
    # stores (decode_gluon_launch.scatter_undoes) forced either way, to time it against the policy
    "undo_never": [(IMPORTED, IMPORTED.replace("scatter_undoes, ", "") + UNDOES % False)],
    "undo_always": [(IMPORTED, IMPORTED.replace("scatter_undoes, ", "") + UNDOES % True)],
}


def _span(text: str, first: str, last: str) -> str:
    """The lines of text from the one containing `first` to the one containing `last` (after it)."""
    start = text.rindex("\n", 0, text.index(first)) + 1
    return text[start:text.index("\n", text.index(last, start)) + 1]


# the scatter with index channels: main's _scatter_asm without its queue (set-up, sentinels,
# hand-over) and with the channel of each value from a byte: the value's own low byte, so the
# channels spread like random kept ones (a row past the tile stores its stale values at their
# channels, which the masks or the undo clear)
_MAIN = SOURCE.read_text()
QUEUE_SETUP = _span(_MAIN, "parts = [\"{ .reg .pred pz, ps;", "add.u32 q, q, 512; add.u32 a, t, %s;")
INDEX_SETUP = ('    parts = ["{ .reg .b32 t, x, i, a, o, base, v<%d>;" % nvals,\n'
               '             "mov.u32 t, mt_dstage; add.u32 base, t, %s; add.u32 a, t, %s;" % (drow, vrow)]\n')
HAND_OVER = _span(_MAIN, "if r + 1 < capacity:  # clear the bit", "@!ps add.u32 q, q, 256;\")")
INDEX_STORE = ('"prmt.b32 i, %s, 0, 0x4440; and.b32 i, i, %d; mad.lo.u32 a, i, 2, base; st.shared.u16 [a], %s;"'
               ' % (val, 32 * num_words - 1, val)')
ABLATIONS["index_channels"] = [(QUEUE_SETUP, INDEX_SETUP), (HAND_OVER, ""), (STORE, INDEX_STORE)]
ABLATIONS["index_channels_undo"] = ABLATIONS["index_channels"] + ABLATIONS["undo_always"]


def ablated_source(name: str) -> str:
    """decode_gluon.py with ablation `name`'s edits (each must match exactly once)."""
    text = SOURCE.read_text()
    for old, new in ABLATIONS[name]:
        if text.count(old) != 1:
            raise ValueError(f"ablation {name!r}: {old[:60]!r} occurs {text.count(old)} times in {SOURCE.name}")
        text = text.replace(old, new)
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=Path(".gen"))
    ap.add_argument("--ablations", default=",".join(ABLATIONS))
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.ablations.split(","):
        path = args.out_dir / f"scatter_{name}.py"
        path.write_text(ablated_source(name))
        print(path)


if __name__ == "__main__":
    main()
