#!/usr/bin/env python3
"""A CPU model of the GDPA forward's DRAM reads (sm90_ws, the jagged list's persistent walk):
how many bytes of q, k, v come from DRAM rather than L2, for bench_gdpa's batches. No GPU, no
attnkit build: it replays the walk's reads through an LRU cache.

Why (docs/performance.md, twenty-seventh session): ncu on an H100 at max length 512 has the dense
forward reading q + k + v once (1.00x) and the jagged one 1.48x. The model: the jagged list
(buckets of key half-tiles, longest first, a sequence's items together, sequences shuffled
inside a bucket), the snake over G persistent CTAs, a time model (a unit costs its key tiles,
0.55 for a narrow one, times --short-unit-speed when it has <= 64 query rows, plus an overhead),
reads in box granularity (a Q box of 128 rows, 64 with --narrow-q when <= 64 rows; K / V boxes of
128 or 64 rows; rows past T not read), and an LRU L2 of --cap-mb at one row of one head (256
bytes: D 128 bf16). Prints DRAM reads / (q + k + v) and the makespan / mean CTA time.

  python3 benchmarks/model_gdpa_l2.py --max-len 512 --short-unit-speed 0.6                # 1.50x
  python3 benchmarks/model_gdpa_l2.py --max-len 512 --short-unit-speed 0.6 --whole-items  # 1.14x

(~3-5 minutes each on one core.) Lengths from gdpa_lengths.lengths_for (bench_gdpa's batches).
"""
import argparse
import random

from gdpa_lengths import lengths_for  # torch alone, no attnkit build

p = argparse.ArgumentParser()
p.add_argument("--max-len", type=int, default=512)
p.add_argument("--sparsity", type=float, default=0.5)
p.add_argument("--batch", type=int, default=1152)
p.add_argument("--heads", type=int, default=4)
p.add_argument("--cap-mb", type=float, default=50)
p.add_argument("--ctas", type=int, default=132)
p.add_argument("--narrow-q", action="store_true")
p.add_argument("--dense-walk", action="store_true",
               help="the in-order walk of the dense instance (full tiles, no list)")
p.add_argument("--whole-items", action="store_true",
               help="one list item per (sequence, head), walking all of its query tiles (cost: "
               "key half-tiles x query tiles), instead of one per query tile")
p.add_argument("--unit-overhead", type=float, default=0.6, help="a unit's fixed cost in key tiles")
p.add_argument("--jitter", type=float, default=0.1, help="relative noise on every unit's cost")
p.add_argument("--seed", type=int, default=1)
p.add_argument("--short-unit-speed", type=float, default=1.0,
               help="time factor of a unit with <= 64 query rows (warpgroup 1 idles on it)")
a = p.parse_args()
rng = random.Random(a.seed)

lens = lengths_for(a.batch, a.max_len, a.sparsity).tolist()
off = [0]
for L in lens:
    off.append(off[-1] + L)
T, H, BM = off[-1], a.heads, 128
q_tiles = (a.max_len + BM - 1) // BM
ROW = 256  # bytes of one row of one head (D 128 bf16)

# Items: (b, h, tile) with the cost bucket (longest first).
items = []
if a.dense_walk:
    # cta_item order: tile fastest, then head, then sequence
    for b in range(a.batch):
        for h in range(H):
            for t in range(min(q_tiles, (lens[b] + BM - 1) // BM)):
                if lens[b] > 0:
                    items.append((b, h, t))
else:
    buckets = {}
    for b in range(a.batch):
        if lens[b] <= 0:
            continue
        tiles = (lens[b] + BM - 1) // BM
        per_item = tiles if a.whole_items else (tiles + q_tiles - 1) // q_tiles
        cost = (lens[b] + 63) // 64 * per_item
        buckets.setdefault(cost, []).append(b)
    for cost in sorted(buckets, reverse=True):
        seqs = buckets[cost]
        rng.shuffle(seqs)
        for b in seqs:
            tiles = (lens[b] + BM - 1) // BM
            for h in range(H):
                if a.whole_items:
                    items.append((b, h, 0))
                else:
                    for t in range(min(tiles, q_tiles)):
                        items.append((b, h, t))
G = a.ctas
stride = 1 if a.whole_items else q_tiles
n = len(items)
per_cta = [[] for _ in range(G)]
r = 0
while r * G < n:
    for c in range(G):
        i = r * G + ((G - 1 - c) if (r & 1) else c)
        if i < n:
            per_cta[c].append(items[i])
    r += 1

# Events: (time, cta, seq no, tensor, row0, rows, head)
events = []
ends = []
for c in range(G):
    t = 0.0
    k = 0
    for (b, h, tile) in per_cta[c]:
        for i0 in range(tile * BM, lens[b], stride * BM):
            qrows = lens[b] - i0
            narrow_q = a.narrow_q and qrows <= 64 and not a.dense_walk
            events.append((t, c, k, 0, off[b] + i0, 64 if narrow_q else 128, h)); k += 1
            j0 = 0
            while j0 < lens[b]:
                narrow = (not a.dense_walk) and lens[b] - j0 <= 64
                rows = 64 if narrow else 128
                events.append((t, c, k, 1, off[b] + j0, rows, h)); k += 1
                events.append((t + 0.3, c, k, 2, off[b] + j0, rows, h)); k += 1
                t += (0.55 if narrow else 1.0) * (a.short_unit_speed if qrows <= 64 else 1.0)
                j0 += 128
            t += a.unit_overhead * (1 + a.jitter * (rng.random() - 0.5))
    ends.append(t)
events.sort()

cap = int(a.cap_mb * 2**20 / ROW)
lru = {}
miss = 0
for (_, _, _, tensor, row0, rows, h) in events:
    for row in range(row0, min(row0 + rows, T)):
        key = (tensor, row, h)
        if key in lru:
            del lru[key]
        else:
            miss += 1
            if len(lru) >= cap:
                del lru[next(iter(lru))]
        lru[key] = None
unique = 3 * T * H
print(f"max_len {a.max_len} sparsity {a.sparsity} T {T} cap {a.cap_mb} MB narrow_q {a.narrow_q} "
      f"dense_walk {a.dense_walk}: DRAM reads / (q+k+v) = {miss / unique:.3f} "
      f"({miss * ROW / 1e9:.3f} GB of {unique * ROW / 1e9:.3f}); whole_items {a.whole_items} "
      f"short_unit_speed {a.short_unit_speed}; makespan / mean CTA time {max(ends) / (sum(ends) / len(ends)):.3f}")
