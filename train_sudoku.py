"""Sudoku with DiffusionGemma: puzzle generation, training and evaluation.

  python train_sudoku.py                               # CPU demo: a small model in a few minutes
  python train_sudoku.py --preset sudoku --device cuda --time-budget 8 --out runs/sudoku
  python train_sudoku.py --init-from DIR ...           # fine-tune a Hugging Face DiffusionGemma checkpoint
  python train_sudoku.py --eval-only --puzzles FILE [--checkpoint DIR] [--attempts K] [--out FILE.jsonl]
  python train_sudoku.py --make-test-sets DIR          # fresh held-out puzzles, 1,000 per bucket
  torchrun --nproc_per_node N train_sudoku.py ...      # data-parallel on N GPUs

The objective is Google's DiffusionGemma SFT recipe: the answer canvas corrupted with uniform random
tokens at rate t ~ U(eps, 1), a flat cross-entropy over the canvas, the encoder's autoregressive
co-loss on prompt + answer, and self-conditioning on half of the examples (a first decoder pass
without gradient feeds the second). The model re-emits the whole grid, clues included.

Sections: Sudoku data (parse, validate, solve, grade, generate) | prompt/answer formats |
batches and augmentation | the objective | training | evaluation | command line.
"""

import argparse
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from bisect import bisect_right
from itertools import accumulate, combinations

import numpy as np
import torch
import torch.nn.functional as F

import diffusiongemma as dg

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED = os.path.join(HERE, "checkpoints", "sudoku")

# =============================================================================
# Sudoku data: grids are 81-character strings, row-major, '0' for a blank cell. Internally a cell is
# a 9-bit candidate mask. Two solvers share the rules (naked + hidden singles, then MRV search): a
# scalar one (solve, grade) and a batched numpy one that the generator uses.

# -----------------------------------------------------------------------------
# lookup tables

ALL = 0x1FF  # all nine candidates
DIGITS = "123456789"
UNITS = ([[r * 9 + c for c in range(9)] for r in range(9)] +                    # rows 0-8
         [[r * 9 + c for r in range(9)] for c in range(9)] +                    # columns 9-17
         [[(b // 3 * 3 + i // 3) * 9 + b % 3 * 3 + i % 3 for i in range(9)] for b in range(9)])  # boxes 18-26
CELL_UNITS = [[i // 9, 9 + i % 9, 18 + (i // 27) * 3 + (i % 9) // 3] for i in range(81)]
PEERS = [sorted({j for u in CELL_UNITS[i] for j in UNITS[u]} - {i}) for i in range(81)]
UNIT_NAMES = ["row"] * 9 + ["column"] * 9 + ["box"] * 9
# box/line intersections for locked candidates: (3 segment cells, 6 rest-of-box, 6 rest-of-line)
INTERSECTIONS = []
for _b in range(18, 27):
    for _l in range(18):
        _seg = set(UNITS[_b]) & set(UNITS[_l])
        if _seg:
            INTERSECTIONS.append((sorted(_seg), sorted(set(UNITS[_b]) - _seg), sorted(set(UNITS[_l]) - _seg)))
POP = [bin(m).count("1") for m in range(512)]                              # popcount
BIT = [0] + [1 << (d - 1) for d in range(1, 10)]                           # digit -> mask
TO_DIGIT = {1 << (d - 1): d for d in range(1, 10)}                         # single mask -> digit
DIGIT_BITS = [[k for k in range(9) if m >> k & 1] for m in range(512)]     # mask -> list of its bit indices

# numpy versions of the tables, for the batched solver
NP_POP = np.array(POP, np.uint8)
NP_LOWBIT = np.array([m & -m for m in range(512)], np.uint16)
NP_TO_DIGIT = np.zeros(512, np.uint8)
for _m, _d in TO_DIGIT.items():
    NP_TO_DIGIT[_m] = _d
NP_BIT = np.array(BIT, np.uint16)
NP_NTH_BIT = np.zeros((512, 9), np.uint16)                                 # k-th set bit of a mask
for _m in range(512):
    _bits = [1 << k for k in range(9) if _m >> k & 1]
    NP_NTH_BIT[_m, :len(_bits)] = _bits
NP_UNITS_T = np.array(UNITS, np.int64).T.copy()                            # [9 positions, 27 units]
NP_CELL_UNITS = np.array(CELL_UNITS, np.int64)                             # [81, 3]
PROGRESS, STUCK, SOLVED, DEAD = 0, 1, 2, 3                                  # batched step status
START_CLUES = 40                                                           # random clues kept before digging one by one

# -----------------------------------------------------------------------------
# parsing and validation

def _clean(line):
    """Strip, keep the first field (up to whitespace or a comma: "puzzle,solution" CSV rows), check length and
    alphabet; '.' -> '0'."""
    s = re.split(r"[\s,]", line.strip(), maxsplit=1)[0]
    if len(s) != 81:
        raise ValueError(f"puzzle has {len(s)} cells, expected 81 (digits 1-9, '.' or '0' for blanks)")
    for i, ch in enumerate(s):
        if ch not in ".0123456789":
            raise ValueError(f"bad character {ch!r} at cell {i + 1} (row {i // 9 + 1}, column {i % 9 + 1}); "
                             "use digits 1-9, and '.' or '0' for blanks")
    return s.replace(".", "0")


def parse_puzzle(line: str) -> str:
    """Parse one puzzle line into the canonical 81-char form ('0' = blank); ValueError on bad input."""
    p = _clean(line)
    for u, cells in enumerate(UNITS):
        seen = {}
        for i in cells:
            d = p[i]
            if d != "0" and d in seen:
                raise ValueError(f"contradictory clues: digit {d} twice in {UNIT_NAMES[u]} {u % 9 + 1} "
                                 f"(cells {seen[d] + 1} and {i + 1}); fix or blank one of them")
            seen[d] = i
    return p


def is_valid_solution(grid: str, puzzle: str | None = None) -> bool:
    """True if grid is a complete valid Sudoku (every unit a permutation of 1-9) agreeing with puzzle's clues."""
    if not isinstance(grid, str) or len(grid) != 81 or any(ch not in DIGITS for ch in grid):
        return False
    if any(sorted(grid[i] for i in cells) != list(DIGITS) for cells in UNITS):
        return False
    if puzzle is not None:
        if len(puzzle) != 81:
            return False
        return all(p in ".0" or p == g for p, g in zip(puzzle, grid))
    return True

# -----------------------------------------------------------------------------
# scalar solver: bitmask candidates, naked + hidden singles, MRV depth-first search

def _cands(puzzle):
    """Candidate masks (list of 81 ints) for a canonical puzzle; clues become single-bit masks."""
    return [BIT[int(ch)] if ch != "0" else ALL for ch in puzzle]


def _propagate(c, stack=None):
    """Apply naked and hidden singles to candidate list c in place until nothing changes. False on contradiction.

    stack: the solved cells whose digit still has to be removed from their peers (default: all solved cells).
    """
    if 0 in c:
        return False
    if stack is None:
        stack = [i for i in range(81) if POP[c[i]] == 1]
    while True:
        while stack:                                   # naked singles: remove a placed digit from its peers
            i = stack.pop()
            b = c[i]
            for p in PEERS[i]:
                if c[p] & b:
                    v = c[p] & ~b
                    if not v:
                        return False
                    c[p] = v
                    if POP[v] == 1:
                        stack.append(p)
        for cells in UNITS:                            # hidden singles: a digit with one place left in a unit
            once = twice = 0
            for i in cells:
                v = c[i]
                twice |= once & v
                once |= v
            if once != ALL:
                return False
            uniq = once & ~twice
            if uniq:
                for i in cells:
                    h = c[i] & uniq
                    if h and h != c[i]:
                        if h & (h - 1):
                            return False
                        c[i] = h
                        stack.append(i)
        if not stack:
            return True


def _search(c, limit, sols, counter):
    """Depth-first search from candidate list c, appending solved candidate lists to sols (up to limit)."""
    if not _propagate(c):
        return
    best, best_pop = -1, 10
    for i in range(81):
        n = POP[c[i]]
        if 1 < n < best_pop:
            best, best_pop = i, n
            if n == 2:
                break
    if best < 0:
        sols.append(c)
        return
    v = c[best]
    while v:
        b = v & -v
        v ^= b
        counter[0] += 1
        child = c.copy()
        child[best] = b
        _search(child, limit, sols, counter)
        if len(sols) >= limit:
            return


def _to_grid(c):
    """Solved candidate list -> 81-char digit string."""
    return "".join(str(TO_DIGIT[m]) for m in c)


def solve(puzzle: str, limit: int = 2) -> tuple[list[str], int]:
    """Find up to `limit` solutions. Returns (solutions, guesses): guesses = branch values tried (0 = singles
    suffice)."""
    sols, counter = [], [0]
    _search(_cands(_clean(puzzle)), limit, sols, counter)
    return [_to_grid(s) for s in sols], counter[0]

# -----------------------------------------------------------------------------
# grading: hardest technique needed on a small ladder

def _locked_candidates(c):
    """Pointing and claiming (box/line intersections). Edits c in place; True if anything was eliminated."""
    changed = False
    for seg, rest_box, rest_line in INTERSECTIONS:
        s = c[seg[0]] | c[seg[1]] | c[seg[2]]
        rb = rl = 0
        for i in rest_box:
            rb |= c[i]
        for i in rest_line:
            rl |= c[i]
        for digits, others in ((s & ~rb & rl, rest_line), (s & ~rl & rb, rest_box)):  # pointing, claiming
            if digits:
                for i in others:
                    if c[i] & digits:
                        c[i] &= ~digits
                        changed = True
    return changed


def _subsets(c, k):
    """Naked and hidden subsets of size k (pairs, triples) in every unit. Edits c in place; True on progress."""
    changed = False
    for cells in UNITS:
        vals = [c[i] for i in cells]
        open_ = [j for j in range(9) if POP[vals[j]] > 1]
        if len(open_) <= k:
            continue
        for combo in combinations(open_, k):           # naked: k cells holding only k digits
            m = 0
            for j in combo:
                m |= vals[j]
            if POP[m] == k:
                for j in open_:
                    if j not in combo and vals[j] & m:
                        vals[j] &= ~m
                        changed = True
        # hidden: k digits confined to k cells. Scan all cells, solved ones too: singles made
        # just above are not propagated yet, so a placed digit may still show up elsewhere.
        pos = [0] * 9
        for j, v in enumerate(vals):
            for d in DIGIT_BITS[v]:
                pos[d] |= 1 << j
        digits = [d for d in range(9) if POP[pos[d]] > 1]
        for combo in combinations(digits, k):
            u = 0
            for d in combo:
                u |= pos[d]
            if POP[u] == k:
                m = sum(1 << d for d in combo)
                for j in DIGIT_BITS[u]:
                    if vals[j] & ~m:
                        vals[j] &= m
                        changed = True
        for i, v in zip(cells, vals):
            c[i] = v
    return changed


def _ladder(c):
    """Grade candidate list c that singles have already propagated to a fixpoint (see grade)."""
    level = "singles"
    while True:
        open_ = [i for i in range(81) if POP[c[i]] > 1]
        if not open_:
            return level
        if not (_locked_candidates(c) or _subsets(c, 2) or _subsets(c, 3)):
            return "hard"
        level = "intermediate"
        if not _propagate(c, [i for i in open_ if POP[c[i]] == 1]):  # only the newly solved cells
            raise ValueError("puzzle has no solution")


GRADES = ("singles", "intermediate", "hard")


def grade(puzzle: str) -> str:
    """Difficulty bucket by the hardest technique needed: 'singles' (naked + hidden singles solve it),
    'intermediate' (also locked candidates, naked/hidden pairs and triples) or 'hard' (needs guessing).
    A puzzle with several solutions grades 'hard'; one with none raises ValueError."""
    c = _cands(_clean(puzzle))
    if not _propagate(c):
        raise ValueError("puzzle has no solution")
    return _ladder(c)

# -----------------------------------------------------------------------------
# batched numpy solver: the same rules on [M, 81] uint16 candidate masks

def _batch_step(T):
    """One round of naked + hidden singles on T [81, M] (one column per puzzle). Returns (new T, status [M])."""
    single = (T & (T - 1) == 0) & (T != 0)
    U = T[NP_UNITS_T]                                          # [9 cells, 27 units, M]
    once, twice = U[0].copy(), np.zeros_like(U[0])
    for j in range(1, 9):
        twice |= once & U[j]
        once |= U[j]
    # naked singles: drop the digits placed anywhere in the cell's three units
    placed = np.bitwise_or.reduce(np.where(single, T, np.uint16(0))[NP_UNITS_T], axis=0)
    g = placed[NP_CELL_UNITS]                                  # [81, 3, M]
    new = np.where(single, T, T & ~(g[:, 0] | g[:, 1] | g[:, 2]))
    # hidden singles: a digit with exactly one possible cell left in one of the cell's units
    g = (once & ~twice)[NP_CELL_UNITS]
    h = T & (g[:, 0] | g[:, 1] | g[:, 2])
    hidden = (h != 0) & ~single
    new = np.where(hidden, new & h, new)
    # dead: an empty cell, a digit with no place in a unit, one cell forced to two digits at once,
    # or a digit placed twice in a unit (fewer distinct placed digits than placed cells)
    dead = ((T == 0).any(0) | (once != ALL).any(0) | (hidden & (h & (h - 1) != 0)).any(0)
            | (NP_POP[placed] != single[NP_UNITS_T].sum(0, dtype=np.uint8)).any(0))
    status = np.where((new != T).any(0), PROGRESS, STUCK)
    status[single.all(0)] = SOLVED
    status[dead] = DEAD
    return new, status


def _batch_propagate(S):
    """Batched singles to a fixpoint on S [M, 81]. Returns (S, status) with status SOLVED, STUCK or DEAD per row."""
    T = np.ascontiguousarray(S.T)
    status = np.full(T.shape[1], PROGRESS)
    act = np.arange(T.shape[1])
    while act.size:
        new, st = _batch_step(T[:, act])
        T[:, act] = new
        status[act] = st
        act = act[st == PROGRESS]
    return np.ascontiguousarray(T.T), status


def _batch_search(S0, limit, rng=None, small=4):
    """Depth-first search for many puzzles at once, one explicit stack per puzzle.

    S0: [N, 81] uint16 candidate masks. Returns (count [N], solutions [N, limit, 81] uint8 digits).
    With rng, branching picks a random cell among the MRV ties and a random value (random fill).
    When `small` or fewer puzzles are left, the scalar solver finishes them.
    """
    N = len(S0)
    stack = np.zeros((N, 83, 81), np.uint16)
    stack[:, 0] = S0
    sp = np.ones(N, np.int64)
    count = np.zeros(N, np.int64)
    sols = np.zeros((N, limit, 81), np.uint16)
    act = np.arange(N)
    while act.size > small:
        cur, status = _batch_propagate(stack[act, sp[act] - 1])
        done = status == SOLVED
        a = act[done]
        sols[a, count[a]] = cur[done]
        count[a] += 1
        sp[act[status != STUCK]] -= 1                   # solved or dead: pop
        m = status == STUCK
        if m.any():                                    # branch on the open cell with fewest candidates
            a, x = act[m], cur[m]
            pop = NP_POP[x]
            key = np.where(pop > 1, pop, np.uint8(10)).astype(np.int64) * 128
            if rng is not None:
                key += rng.integers(0, 128, key.shape)
            cell = key.argmin(1)
            r = np.arange(len(a))
            v = x[r, cell]
            pick = (NP_NTH_BIT[v, rng.integers(0, NP_POP[v])] if rng is not None else NP_LOWBIT[v])
            x[r, cell] = v & ~pick                      # "any other value" stays on the stack
            stack[a, sp[a] - 1] = x
            x[r, cell] = pick                           # "this value" is explored first
            stack[a, sp[a]] = x
            sp[a] += 1
        act = act[(count[act] < limit) & (sp[act] > 0)]
    for a in act:                                      # scalar tail: pending states, top of stack first
        for level in range(sp[a] - 1, -1, -1):
            found = []
            _search([int(m) for m in stack[a, level]], limit - count[a], found, [0])
            for s in found:
                sols[a, count[a]] = s
                count[a] += 1
            if count[a] >= limit:
                break
    return count, NP_TO_DIGIT[sols]


def _masks(grids, clue):
    """[N,81] digit grids + [N,81] clue mask -> candidate masks (clues single-bit, blanks ALL)."""
    return np.where(clue, NP_BIT[grids], ALL).astype(np.uint16)

# -----------------------------------------------------------------------------
# puzzle generation

def _random_grids(n, rng):
    """n random complete grids ([n,81] uint8) by randomized DFS fill; the three diagonal boxes are seeded at random."""
    S = np.full((n, 81), ALL, np.uint16)
    for b in (18, 22, 26):
        S[:, UNITS[b]] = NP_BIT[rng.random((n, 9)).argsort(1) + 1]
    count, sols = _batch_search(S, 1, rng=rng)
    assert (count == 1).all()
    return sols[:, 0]


def _dig(grids, target, rng):
    """Choose a unique-solution clue set for each grid ([N,81] uint8). Returns (clue mask [N,81], ok [N]).

    1. keep max(START_CLUES, target) random cells as clues;
    2. while a puzzle has two solutions, add back (from the grid) the first cell, in the random
       priority order, where the two solutions differ;
    3. try removing the clues one at a time in random order, keeping each removal that leaves the
       solution unique; stop at `target` clues (ok=False if every clue was tried and more remain),
       or for target=None try them all, which gives a minimal puzzle.
    Every step is one batched search over all the puzzles still in play.
    """
    N = len(grids)
    r = np.arange(N)
    rank = rng.random((N, 81)).argsort(1).argsort(1)         # random priority of each cell
    clue = rank < max(START_CLUES, target or 0)
    act = r
    while act.size:                                          # add back until unique
        count, sols = _batch_search(_masks(grids[act], clue[act]), 2)
        act, sols = act[count > 1], sols[count > 1]
        cell = np.where(sols[:, 0] != sols[:, 1], rank[act], 81).argmin(1)
        clue[act, cell] = True
    goal = 0 if target is None else target
    n_clues = clue.sum(1)
    order = np.where(clue, rng.random((N, 81)), 2.0).argsort(1)  # clue cells first, in random order
    for k in range(int(n_clues.max())):                      # remove clues while the solution stays unique
        act = r[(clue.sum(1) > goal) & (k < n_clues)]
        if not act.size:
            break
        cell = order[act, k]
        # the puzzle was unique, so after blanking `cell` any other solution must differ there:
        # forbid the grid's digit in that cell and check that nothing is left to find
        S = _masks(grids[act], clue[act])
        S[np.arange(act.size), cell] = ALL & ~NP_BIT[grids[act, cell]]
        count, _ = _batch_search(S, 1)
        clue[act[count == 0], cell[count == 0]] = False
    ok = clue.sum(1) == goal if target is not None else np.ones(N, bool)
    return clue, ok


def _batch_grade(puzzles):
    """Grade many canonical puzzles: batched singles first, scalar technique ladder for the rest."""
    S = np.array([_cands(p) for p in puzzles], np.uint16).reshape(-1, 81)
    S, status = _batch_propagate(S)
    if (status == DEAD).any():
        raise ValueError("puzzle has no solution")
    return ["singles" if st == SOLVED else _ladder([int(m) for m in s]) for s, st in zip(S, status)]


def generate_puzzles(n: int, clues: int | None = 30, seed: int = 0, batch: int = 2048) -> list[dict]:
    """n distinct unique-solution puzzles with exactly `clues` clues (None = minimal puzzles).

    Each row: {"puzzle": 81 chars '0'=blank, "solution": 81 chars, "clues": int, "grade": str}.
    Every grid is a fresh randomized DFS fill. Output is fixed by (n, clues, seed, batch).
    Minimal puzzles have 21-28 clues (mean ~24.4); asking for fewer than 24 clues gets slow
    (rejection), and if fewer than 0.5% of grids reach the target a RuntimeError is raised.
    """
    if clues is not None and not 17 <= clues <= 81:
        raise ValueError(f"clues={clues} out of range, expected 17..81 or None (minimal puzzles)")
    rng = np.random.default_rng(seed)
    rows, seen, tried, rate = [], set(), 0, 1.0
    while len(rows) < n:
        want = n - len(rows)
        m = min(batch, int(want / max(rate, 0.05) * 1.1) + 8)
        grids = _random_grids(m, rng)
        clue, ok = _dig(grids, clues, rng)
        tried += m
        puzzles = (np.where(clue, grids, 0) + ord("0")).astype(np.uint8)[ok]
        solutions = (grids + ord("0")).astype(np.uint8)[ok]
        new = []
        for p, g, c in zip(puzzles, solutions, clue[ok].sum(1)):
            puzzle = p.tobytes().decode()
            if puzzle not in seen:
                seen.add(puzzle)
                new.append({"puzzle": puzzle, "solution": g.tobytes().decode(), "clues": int(c)})
        new = new[:want]
        for row, gr in zip(new, _batch_grade([row["puzzle"] for row in new])):
            row["grade"] = gr
        rows += new
        rate = max(len(rows), 1) / tried
        if tried >= 10000 and rate < 0.005:
            raise RuntimeError(f"only {len(rows)} of {n} puzzles with {clues} clues from {tried} grids: random "
                               "digging rarely goes below 22 clues; ask for more clues or clues=None (minimal)")
    return rows


def generate_dataset(n: int, clue_range: tuple[int, int] = (24, 45), minimal_frac: float = 0.1,
                     seed: int = 0) -> list[dict]:
    """n distinct puzzles: a share `minimal_frac` minimal, the rest with clue counts uniform in clue_range (inclusive).

    Shuffled, deduplicated by puzzle string, deterministic in seed.
    """
    rng = np.random.default_rng(seed)
    lo, hi = clue_range
    n_min = int(round(n * minimal_frac))
    targets = [None] * n_min + [int(t) for t in rng.integers(lo, hi + 1, n - n_min)]
    want = {}
    for t in targets:
        want[t] = want.get(t, 0) + 1
    rows, seen = [], set()
    for i, t in enumerate(sorted(want, key=lambda t: -1 if t is None else t)):
        sub_seed = int(rng.integers(2**62)) + i
        got = 0
        while got < want[t]:                                  # top up if another bucket already had a puzzle
            for row in generate_puzzles(want[t] - got, t, seed=sub_seed):
                if row["puzzle"] not in seen:
                    seen.add(row["puzzle"])
                    rows.append(row)
                    got += 1
            sub_seed += 1
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def split_by_solution(puzzles: list[dict], fractions=(0.98, 0.01, 0.01), seed: int = 0):
    """Split rows into (train, val, test) by a hash of the solution grid, so no grid is in two splits."""
    if abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions {fractions} must sum to 1")
    edges = list(accumulate(fractions))
    splits = tuple([] for _ in fractions)
    for row in puzzles:
        h = hashlib.sha256(f"{seed}:{row['solution']}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64              # uniform in [0, 1), same for equal grids
        splits[min(bisect_right(edges, u), len(splits) - 1)].append(row)
    return splits

# -----------------------------------------------------------------------------
# disk cache and benchmark

def save_puzzles(path: str, rows: list[dict]) -> None:
    """Write rows as JSON lines (gzip if path ends in .gz) atomically: temp file in the same dir, then os.replace."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            f = gzip.GzipFile(fileobj=raw, mode="wb") if path.endswith(".gz") else raw
            for row in rows:
                f.write((json.dumps(row, separators=(",", ":")) + "\n").encode())
            if f is not raw:
                f.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_puzzles(path: str) -> list[dict]:
    """Read rows written by save_puzzles."""
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        return [json.loads(line) for line in f if line.strip()]


def bench_generator(n: int = 2000, clues: int | None = 30, seed: int = 0) -> float:
    """Generate n puzzles and return the rate in puzzles/s (pin to one core with taskset for a 1-core number)."""
    t0 = time.perf_counter()
    rows = generate_puzzles(n, clues, seed=seed)
    dt = time.perf_counter() - t0
    assert len(rows) == n
    return n / dt


def generate_many(jobs, workers=None, chunk=1000):
    """generate_puzzles for many (n, clues, seed) jobs over a pool of processes; duplicates dropped.
    Each job is cut into fixed chunks of `chunk` puzzles with their own seeds, so the puzzles do not
    depend on how many processes make them."""
    chunks = [(min(chunk, n - a), clues, seed * 1000 + a // chunk)
              for n, clues, seed in jobs for a in range(0, n, chunk)]
    workers = min(workers or os.cpu_count() or 1, len(chunks))
    if workers <= 1:
        parts = [generate_puzzles(*c) for c in chunks]
    else:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(workers) as pool:
            parts = pool.starmap(generate_puzzles, chunks)
    seen, rows = set(), []
    for row in (r for part in parts for r in part):
        if row["puzzle"] not in seen:
            seen.add(row["puzzle"])
            rows.append(row)
    return rows


def training_puzzles(n, seed, cache_dir, workers=None):
    """The training set, cached on disk: half minimal puzzles (the hardest random ones, 21-28 clues,
    ~60% of them beyond singles), half with clue counts uniform in 24..45."""
    path = os.path.join(cache_dir, f"train-{n}-seed{seed}.jsonl.gz")
    if os.path.isfile(path):
        return load_puzzles(path)
    t0 = time.time()
    print(f"generating {n} training puzzles on {workers or os.cpu_count()} processes ...", flush=True)
    jobs = [(n // 2, None, seed)] + [(n // 2 // 22 + 1, clues, seed + clues) for clues in range(24, 46)]
    rows = generate_many(jobs, workers)
    rng = np.random.default_rng(seed)
    rows = [rows[i] for i in rng.permutation(len(rows))][:n]
    save_puzzles(path, rows)
    print(f"  {len(rows)} puzzles in {time.time() - t0:.0f} s -> {path}", flush=True)
    return rows


def make_test_sets(folder, n=1000, seed=10_000, workers=None):
    """Fresh held-out puzzles, one file per bucket (puzzle<TAB>solution<TAB>clues<TAB>grade per line):
    singles (30-clue puzzles that naked + hidden singles solve), harder (puzzles that need more than
    singles), minimal (17-24 clues: minimal puzzles, the hardest a random generator makes), and the
    easy sets singles36/40/45 (puzzles with that many clues that singles solve)."""
    os.makedirs(folder, exist_ok=True)
    buckets = {"singles": [], "harder": [], "minimal": []}
    s = seed
    while min(len(b) for b in buckets.values()) < n:
        for row in generate_many([(4 * n, 30, s), (2 * n, None, s + 1)], workers):
            if row["clues"] == 30 and row["grade"] == "singles":
                buckets["singles"].append(row)
            if row["grade"] != "singles":
                buckets["harder"].append(row)
            if row["clues"] <= 24:
                buckets["minimal"].append(row)
        s += 2
    for name, rows in buckets.items():
        write_set(folder, name, rows[:n])
    # easy sets for the CPU demo: puzzles with 36, 40 or 45 clues that singles solve (seed + 50,000 + clues)
    for clues in (36, 40, 45):
        rows = generate_puzzles(max(16, 12 * n // 5), clues, seed=seed + 50_000 + clues)
        write_set(folder, f"singles{clues}", [r for r in rows if r["grade"] == "singles"][:n])


def write_set(folder, name, rows):
    """folder/name.txt, atomically: puzzle<TAB>solution<TAB>clues<TAB>grade per line."""
    lines = "".join(f"{r['puzzle']}\t{r['solution']}\t{r['clues']}\t{r['grade']}\n" for r in rows)
    path = os.path.join(folder, f"{name}.txt")
    dg.atomic_write(path, lambda f: f.write(lines))
    print(f"{name}: {len(rows)} puzzles -> {path}")


# =============================================================================
# Prompt and answer formats
#
# "compact" (models trained from scratch): a character-level tokenizer; the prompt is <bos>, the 81
# puzzle digits ('0' = blank) and a newline; the answer canvas is exactly the 81 solution digits.
# "chat" (fine-tuning a Hugging Face DiffusionGemma): Google's recipe, a system turn with the
# instructions, the space-separated puzzle as the user turn, the space-separated solution as the
# answer, the canvas tail filled with <eos>.

SPECIAL_TOKENS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>"}
COMPACT_CHARS = "0123456789\n"
SYSTEM_PROMPT = ("Solve the following Sudoku puzzle. Empty cells are represented by 0. Output ONLY the solved "
                 "puzzle immediately as a 9x9 grid of numbers separated by spaces. Do not include ####, "
                 "explanations, or any other text.")
EXAMPLE_PUZZLE = "530070000600195000098000060800060003400803001700020006060000280000419005000080079"


def compact_tokenizer_json(vocab_size=16):
    return dg.Tokenizer.char_level_json(COMPACT_CHARS, SPECIAL_TOKENS, vocab_size)


def spaced(grid):
    return "\n".join(" ".join(grid[r * 9:r * 9 + 9]) for r in range(9))


def prompt_ids(tok, puzzle, fmt="compact"):
    if fmt == "compact":
        return [tok.bos_id] + tok.encode(puzzle + "\n")
    chat = (f"<bos><|turn>system\n{SYSTEM_PROMPT}<turn|>\n<|turn>user\n{spaced(puzzle)}<turn|>\n"
            f"<|turn>model\n<|channel>thought\n<channel|>")
    return tok.encode(chat)


def answer_ids(tok, solution, fmt="compact"):
    return tok.encode(solution if fmt == "compact" else spaced(solution))


def read_answer(text):
    """The 81-digit grid in a model's output (the first 81 digits 1-9), or None."""
    digits = [ch for ch in text if ch in DIGITS]
    return "".join(digits[:81]) if len(digits) >= 81 else None


def board(tok, tokens, fmt="compact"):
    """The 81 cells a canvas shows, '.' where a token is not a digit 1-9 (for live display)."""
    if fmt == "compact":
        return "".join(d if len(d) == 1 and d in DIGITS else "." for d in (tok.decode([t]) for t in tokens[:81]))
    return (read_answer(tok.decode(tokens)) or "").ljust(81, ".")


def format_grid(grid, puzzle=None):
    """A 9x9 grid with box separators; the puzzle's clues in bold when stdout is a terminal."""
    if grid is None:
        return "(no grid: the output has fewer than 81 digits)"
    bold = sys.stdout.isatty()
    lines = []
    for r in range(9):
        if r in (3, 6):
            lines.append("------+-------+------")
        cells = []
        for c in range(9):
            d = grid[r * 9 + c]
            d = "." if d in "0." else d
            if bold and puzzle is not None and puzzle[r * 9 + c] != "0":
                d = f"\x1b[1m{d}\x1b[0m"
            cells.append(d + (" |" if c in (2, 5) else ""))
        lines.append(" ".join(cells))
    return "\n".join(lines)


def read_meta(folder):
    """sudoku.json of a Sudoku checkpoint: {"format": "compact" | "chat"}, and optionally "attempts" (the
    default chains per puzzle for --eval-only and sample.py)."""
    path = os.path.join(folder, "sudoku.json")
    try:
        meta = dg.read_json(path)
    except ValueError as e:
        raise dg.DiffusionGemmaError(f"{path} is not valid JSON ({e}); "
                                     f"fix it, e.g. {{\"format\": \"compact\"}}") from None
    if not isinstance(meta, dict) or meta.get("format") not in ("compact", "chat"):
        raise dg.DiffusionGemmaError(f"{path} must say {{\"format\": \"compact\"}} or {{\"format\": \"chat\"}}")
    return meta


# =============================================================================
# Batches: every batch is freshly augmented by the validity-preserving Sudoku symmetries (digit
# relabelling, row/column permutations inside bands/stacks, band/stack permutations, transposition)

def to_tensor(rows, key):
    return torch.tensor(np.frombuffer("".join(r[key] for r in rows).encode(), np.uint8).reshape(-1, 81) - 48,
                        dtype=torch.long)


def augment(puzzles, solutions, g):
    """puzzles, solutions [B, 81] (digits, 0 = blank) -> the same puzzles under random symmetries."""
    B, dev = puzzles.shape[0], puzzles.device
    relabel = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev),
                         torch.argsort(torch.rand(B, 9, generator=g, device=dev), 1) + 1], 1)  # [B, 10], 0 -> 0

    def lines():  # a random order of the 9 rows (or columns) that keeps bands together: [B, 9]
        band = torch.argsort(torch.rand(B, 3, generator=g, device=dev), 1)
        inner = torch.argsort(torch.rand(B, 3, 3, generator=g, device=dev), 2)
        return (band[:, :, None] * 3 + inner).reshape(B, 9)

    rows, cols = lines(), lines()
    index = rows[:, :, None] * 9 + cols[:, None, :]                                  # [B, 9, 9]
    flip = torch.rand(B, generator=g, device=dev) < 0.5
    index = torch.where(flip[:, None, None], index.transpose(1, 2), index).reshape(B, 81)
    p, s = puzzles.gather(1, index), solutions.gather(1, index)
    return relabel.gather(1, p), relabel.gather(1, s)


class Batches:
    """Training batches from puzzle rows: augmentation, then token ids. The draws of batch k come from
    a generator seeded by (seed, k), so a resumed run sees exactly the batches it would have seen."""

    def __init__(self, rows, tok, fmt, canvas_length, batch_size, seed, device, rank=0):
        self.puzzles, self.solutions = to_tensor(rows, "puzzle").to(device), to_tensor(rows, "solution").to(device)
        self.tok, self.fmt, self.C, self.B, self.seed, self.device, self.rank = \
            tok, fmt, canvas_length, batch_size, seed, device, rank
        self.digit_ids = torch.tensor(tok.encode("0123456789"), device=device)  # digit -> token id

    def generator(self, step):
        return torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + step * 1009 + self.rank)

    def get(self, step):
        """-> prompt ids [B, P], prompt validity [B, P], target canvas [B, C], generator for the step's noise."""
        g = self.generator(step)
        pick = torch.randint(0, self.puzzles.shape[0], (self.B,), generator=g, device=self.device)
        p, s = augment(self.puzzles[pick], self.solutions[pick], g)
        if self.fmt == "compact":
            bos = torch.full((self.B, 1), self.tok.bos_id, device=self.device)
            nl = torch.full((self.B, 1), self.tok.encode("\n")[0], device=self.device)
            prompt = torch.cat([bos, self.digit_ids[p], nl], 1)
            target = self.digit_ids[s]
            return prompt, torch.ones_like(prompt, dtype=torch.bool), target, g
        to_str = lambda row: "".join(map(str, row.tolist()))  # noqa: E731 - chat format: tokenize on the host
        prompts = [prompt_ids(self.tok, to_str(r), "chat") for r in p]
        answers = [answer_ids(self.tok, to_str(r), "chat") for r in s]
        prompt, valid = dg.left_pad(prompts, dg.Config().pad_token_id, self.device)
        eos = self.tok.tok.token_to_id("<eos>")
        target = torch.tensor([a[:self.C] + [eos] * (self.C - len(a)) for a in answers], device=self.device)
        return prompt, valid, target, g


# =============================================================================
# The objective (Google's SFT recipe for DiffusionGemma)

def corrupt(target, vocab_size, g, eps=1e-3):
    """Each canvas token is replaced by a uniform random vocabulary token with probability t ~ U(eps, 1)
    (one t per example). Returns the noisy canvas and t."""
    B, C = target.shape
    t = eps + (1 - eps) * torch.rand(B, generator=g, device=target.device)
    hit = torch.rand(B, C, generator=g, device=target.device) < t[:, None]
    noise = torch.randint(0, vocab_size, (B, C), generator=g, device=target.device)
    return torch.where(hit, noise, target), t


class Objective(torch.nn.Module):
    """The training loss of one batch; a module so DistributedDataParallel can wrap it."""

    def __init__(self, model, sc_prob=0.5, ar_weight=1.0):
        super().__init__()
        self.model, self.sc_prob, self.ar_weight = model, sc_prob, ar_weight

    def forward(self, prompt, valid, target, g):
        model, V = self.model, self.model.cfg.vocab_size
        noisy, _ = corrupt(target, V, g)
        cache = model.new_cache(prompt.shape[0])
        h_prompt = model.encode(prompt, cache, valid)            # causal pass over the clean prompt
        with torch.no_grad():                                      # self-conditioning: a first pass ...
            first = model.denoise(noisy, cache)
        use_sc = torch.rand(prompt.shape[0], generator=g, device=prompt.device) < self.sc_prob
        logits = model.denoise(noisy, cache, first, sc_mask=use_sc)  # ... feeds the second on half the rows
        diffusion = F.cross_entropy(logits.flatten(0, 1), target.flatten())  # flat, every canvas position
        # autoregressive co-loss: the encoder continues over the clean answer; next-token CE on prompt + answer
        h_answer = model.encode(target, cache)
        seq = torch.cat([prompt, target], 1)
        seq_valid = torch.cat([valid, torch.ones_like(target, dtype=torch.bool)], 1)
        ar_logits = model.head(torch.cat([h_prompt, h_answer], 1)[:, :-1])
        ar_mask = seq_valid[:, :-1] & seq_valid[:, 1:]
        ar = F.cross_entropy(ar_logits[ar_mask], seq[:, 1:][ar_mask])
        return diffusion + self.ar_weight * ar, diffusion.detach(), ar.detach()


# =============================================================================
# Training

def lr_at(step, total, peak, warmup, final_frac=0.1):
    """Linear warmup, then cosine decay to final_frac * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def side_files(source, cfg, fmt):
    """(generation_config, sudoku.json) for the checkpoints a run writes. A run that starts from a Sudoku
    checkpoint (--init-from, --resume) keeps its sampler settings and default chains; any other run gets
    the sampler's defaults, at most 48 steps."""
    gen = dict(max_new_tokens=cfg.canvas_length if fmt == "compact" else 256, max_denoising_steps=48,
               eos_token_id=[1] if fmt == "compact" else [1, 106, 50], pad_token_id=0)
    if not (source and os.path.isfile(os.path.join(source, "sudoku.json"))):
        return gen, {"format": fmt}
    gen_path = os.path.join(source, "generation_config.json")
    if os.path.isfile(gen_path):
        dg.GenerationConfig.from_pretrained(source)  # one clear error line if it is malformed
        gen = dg.read_json(gen_path)
    return gen, read_meta(source)


def save_run(model, path, tok_json, meta, gen_cfg, state=None, dtype=None, max_shard_bytes=5 * 10**9):
    """A checkpoint that sample.py and transformers load (+ train_state.pt for --resume), atomically.
    meta: sudoku.json ({"format": ...}, optionally "attempts")."""
    extra = {"tokenizer.json": tok_json, "sudoku.json": json.dumps(meta),
             "generation_config.json": json.dumps(gen_cfg, indent=2)}
    if state is not None:
        extra["train_state.pt"] = lambda f: torch.save(state, f)
    src = model
    if dtype is not None and dtype != next(model.parameters()).dtype:
        src = type(model)(model.cfg).to(dtype)
        src.load_state_dict(model.state_dict())
    dg.save_checkpoint(src, path, max_shard_bytes, extra_files=extra)


def setup_distributed(device_arg):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: one process per GPU. Returns (rank, world, device)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, dg.resolve_device(device_arg)
    import torch.distributed as dist
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return rank, world, f"cuda:{local}"
    dist.init_process_group("gloo")
    return rank, world, "cpu"


def read_tokenizer(folder):
    """The text of a checkpoint folder's tokenizer.json, or one clear error."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise dg.DiffusionGemmaError(f"{folder!r} has no tokenizer.json; give a checkpoint folder that has one")
    with open(path, encoding="utf-8") as f:
        return f.read()


def build_model(args, device):
    """(model, tokenizer json, format): a fresh small preset, or a Hugging Face checkpoint to fine-tune
    (a Sudoku checkpoint keeps its own format, so a run can start from the bundled model)."""
    if args.init_from:
        model = dg.DiffusionGemma.from_pretrained(args.init_from, device=device, dtype=torch.float32)
        is_sudoku = os.path.isfile(os.path.join(args.init_from, "sudoku.json"))
        return model, read_tokenizer(args.init_from), read_meta(args.init_from)["format"] if is_sudoku else "chat"
    cfg = dg.Config.preset(args.preset)
    torch.manual_seed(args.seed)
    model = dg.DiffusionGemma(cfg).init_weights(std=0.02).to(device)
    return model, compact_tokenizer_json(cfg.vocab_size), "compact"


def has_cpp_compiler():
    """Whether torch.compile can build CPU kernels here (inductor needs a C++ compiler)."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "c++") if c)


FINISH_SECONDS = 30  # kept for the final validation solve and the save when --max-minutes shrinks a run


def end_distributed():
    """Closes a data-parallel run's process group once training returned: every process first waits for the others
    (rank 0 may still be saving), so that none exits with the group's threads still running; under gloo that
    aborted a process ("terminate called without an active exception") in a CI run. Not after an error: a process
    that failed leaves, and torchrun stops the others."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def over_processes(n: int, device, op="min") -> int:
    """min(n) or max(n) over the processes of a data-parallel run (n itself in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return n
    t = torch.tensor([n], device=device)
    ops = {"min": torch.distributed.ReduceOp.MIN, "max": torch.distributed.ReduceOp.MAX}
    torch.distributed.all_reduce(t, op=ops[op])
    return int(t.item())


def load_run(args, device):
    """(model, tokenizer json, format, saved state or None): the run that --resume names (its settings
    replace args', except this call's own), or a new one (build_model)."""
    if not args.resume:
        return *build_model(args, device), None
    state_path = os.path.join(args.resume, "train_state.pt")
    if not os.path.isfile(state_path):
        raise dg.DiffusionGemmaError(f"{args.resume!r} has no train_state.pt; resume from a folder that "
                                     f"train_sudoku.py saved during training")
    state = torch.load(state_path, weights_only=False, map_location="cpu")
    keep = {k: getattr(args, k) for k in ("out", "device", "resume", "stop_after", "stop_after_minutes",
                                          "export", "workers", "compile")}  # this call's, not the run's
    vars(args).update({**state["args"], **keep})  # the run's own settings and schedule
    args.steps = state["total_steps"]
    model = dg.DiffusionGemma.from_pretrained(args.resume, device=device, dtype=torch.float32)
    return model, read_tokenizer(args.resume), read_meta(args.resume)["format"], state


def training_rows(args):
    """(train rows, validation rows): the generated puzzles of --grades, split by solution grid."""
    rows = training_puzzles(args.train_puzzles, args.seed, args.data_dir, args.workers)
    if args.grades:  # e.g. a fine-tuning stage on the puzzles that need more than singles
        rows = [r for r in rows if r["grade"] in args.grades]
        if not rows:
            raise dg.DiffusionGemmaError(f"--grades {','.join(args.grades)}: none of the {args.train_puzzles} "
                                         f"training puzzles has these grades; raise --train-puzzles")
    train_rows, val_rows, _ = split_by_solution(rows, (0.99, 0.01, 0.0), seed=args.seed)
    if not train_rows:
        raise dg.DiffusionGemmaError(f"no training puzzles left after the validation split ({len(rows)} puzzles); "
                                     f"raise --train-puzzles")
    return train_rows, val_rows[:args.eval_puzzles]


def make_optimizer(model, args, device):
    """AdamW, with weight decay on the matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                             fused=torch.device(device).type == "cuda")


def fitted_steps(args, per_step, started, t_start, log):
    """The step count that ends the run in time at per_step seconds a step, measured over steps 10-30:
    within --time-budget minutes of the training's start (t_start), and no later than --max-minutes after the
    run's start (started), keeping FINISH_SECONDS for the end."""
    steps = args.steps
    if args.time_budget:
        steps = max(40, int((args.time_budget * 60 - (time.time() - t_start)) / per_step) + 30)
        log(f"time budget {args.time_budget} min at {per_step * 1e3:.0f} ms/step -> {steps} steps")
    if args.max_minutes:
        left = started + 60 * args.max_minutes - FINISH_SECONDS - time.time()
        fits = max(31, 30 + int(left / per_step))
        if fits < steps:
            log(f"--max-minutes {args.max_minutes:g}: at {per_step * 1e3:.0f} ms/step, {steps} steps "
                f"would not end in time -> {fits} steps")
            steps = fits
    return steps


def train(args):
    started = time.time()  # --max-minutes counts from here: data, compiling, training, the last solve
    rank, world, device = setup_distributed(args.device)
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    model, tok_json, fmt, state = load_run(args, device)
    if args.batch_size % world:
        raise dg.DiffusionGemmaError(f"--batch-size {args.batch_size} does not split over {world} processes; "
                                     f"give a multiple of {world}")
    tok = dg.Tokenizer.from_json(tok_json)
    on_gpu = torch.device(device).type == "cuda"
    model.set_experts_impl("grouped" if on_gpu else "loop")
    on_cpu = torch.device(device).type == "cpu"
    if args.compile == "on" or (args.compile == "auto" and (on_gpu or (on_cpu and has_cpp_compiler()))):
        model.compile_layers()  # fuses the layers' small kernels (the first steps pay for compiling)
    model.train()
    cfg = model.cfg

    train_rows, val_rows = training_rows(args)
    batches = Batches(train_rows, tok, fmt, cfg.canvas_length, args.batch_size // world, args.seed, device, rank)
    objective = Objective(model, args.sc_prob, args.ar_weight)
    if world > 1:
        objective = torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)
    opt = make_optimizer(model, args, device)
    step = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu)
    gen_cfg, meta = side_files(args.resume or args.init_from, cfg, fmt)

    def checkpoint(path, final=False):
        if not is_main:
            return
        st = dict(step=step, total_steps=args.steps, optimizer=opt.state_dict(), args=vars(args))
        save_run(model, path, tok_json, meta, gen_cfg, state=st)
        if final and args.export:
            save_run(model, args.export, tok_json, meta, gen_cfg, dtype=torch.bfloat16, max_shard_bytes=12 * 10**6)
            log(f"exported bf16 weights to {args.export}")

    interrupted = []
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))  # Ctrl-C: finish the step, save, exit
    log(f"model {model.num_params() / 1e6:.2f}M parameters ({cfg.num_experts} experts, top {cfg.top_k_experts}), "
        f"{len(train_rows)} training puzzles, batch {args.batch_size}, device {device} x{world}")
    tokens_per_step = args.batch_size * (batches.get(0)[0].shape[1] + 3 * cfg.canvas_length)
    t_start, t_last, step_last = time.time(), time.time(), step
    pace = state is None and (args.time_budget or args.max_minutes)  # measure steps 10-30 to size the schedule
    while step < args.steps:
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        prompt, valid, target, g = batches.get(step)
        with autocast:
            loss, diffusion, ar = objective(prompt, valid, target, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        if pace and step == 10:
            t10 = time.time()
        if pace and step == 30:  # steps 10-30 (past the warm-up of kernels and allocator) set the pace, once
            args.steps = fitted_steps(args, (time.time() - t10) / 20, started, t_start, log)
            args.steps = over_processes(args.steps, device)  # every process runs the same steps
        if step % args.log_every == 0 or step == args.steps:
            now = time.time()
            rate = (step - step_last) / (now - t_last)
            eta = (args.steps - step) / max(rate, 1e-9)
            log(f"step {step}/{args.steps} | loss {loss.item():.4f} (diffusion {diffusion.item():.4f}, "
                f"ar {ar.item():.4f}) | grad {gnorm.item():.2f} | lr {lr:.2e} | "
                f"{rate * tokens_per_step / 1e3:.0f}k tok/s | ETA {eta / 60:.1f} min", flush=True)
            t_last, step_last = now, step
        if is_main and args.eval_every and (step % args.eval_every == 0 or step == args.steps) and val_rows:
            model.eval()
            with autocast:
                res = evaluate(model, tok, fmt, [r["puzzle"] for r in val_rows], max_steps=16,
                               batch_size=args.eval_batch, seed=0)
            model.train()
            log(f"  eval: {res['solved']}/{res['n']} validation puzzles solved "
                f"({100 * res['solved'] / res['n']:.1f}%), mean steps {res['mean_steps']:.1f}", flush=True)
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            checkpoint(args.out)
        out_of_time = args.stop_after_minutes is not None and time.time() - t_start >= 60 * args.stop_after_minutes
        # every process stops at the same step (a clock or a Ctrl-C may reach one first): a process that went on
        # alone would wait forever for the others in its next gradient all-reduce
        stop = over_processes(int(bool(interrupted) or out_of_time), device, "max")
        if stop or step == args.stop_after:
            checkpoint(args.out)
            log(f"stopped: saved step {step} to {args.out}; continue with --resume {args.out}")
            return model
    checkpoint(args.out, final=True)
    log(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min; saved to {args.out}")
    if val_rows and fmt == "compact":  # the easiest validation puzzle, to try the model on
        easy = max(val_rows, key=lambda r: r["clues"])["puzzle"]
        log(f"try it: python sample.py --checkpoint {args.out} --attempts 32 --show --prompt {easy}")
    return model


# =============================================================================
# Evaluation

def wilson(k, n, z=1.96):
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 0.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pick_attempt(grids, puzzle):
    """Index of the first of one puzzle's candidate grids (81-digit strings, None where an output did not
    parse) that is a valid solution keeping the clues, else 0. This checks the Sudoku rules, it does not
    solve: it can only choose among the model's own outputs."""
    return next((k for k, grid in enumerate(grids) if is_valid_solution(grid, puzzle)), 0)


def read_attempts(requested, folder):
    """Chains per puzzle: --attempts if given, else the checkpoint's sudoku.json "attempts", else 1."""
    k, source = requested, "--attempts"
    if k is None:
        k, source = read_meta(folder).get("attempts", 1), f"\"attempts\" in {os.path.join(folder, 'sudoku.json')}"
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise dg.DiffusionGemmaError(f"{source} must be a whole number of chains >= 1 (got {k!r})")
    return k


def chains_label(attempts):
    """How a solve rate was measured, so that no printed number is ambiguous."""
    return "1 chain" if attempts == 1 else f"{attempts} chains + rule check"


def first_chain_solved(records):
    """Puzzles that chain 0 alone solved: the single-chain count from the same run. pick_attempt takes the
    first valid chain, so chain 0 solved exactly when the pick is solved and is chain 0."""
    return sum(r["solved"] and r["attempt"] == 0 for r in records)


PROGRESS_SECONDS = 30  # how often a long evaluation prints its progress when stderr is not a terminal


def run_chains(model, tok, fmt, puzzles, chains, gen, generator, batch_size, label="solving"):
    """`chains` denoising chains for each puzzle, side by side: a puzzle's chains are neighbouring rows of
    one generate call, each drawing its own noise, max(1, batch_size // chains) puzzles per call.
    Returns, per puzzle, a list of (grid or None, denoising steps), one per chain. Shows its progress on
    stderr (puzzles done, puzzles/s, ETA): one live line on a terminal, else a line every PROGRESS_SECONDS."""
    out, per_call = [], max(1, batch_size // chains)
    t0 = last = time.time()
    live = sys.stderr.isatty()
    for i in range(0, len(puzzles), per_call):
        chunk = puzzles[i:i + per_call]
        res = dg.generate(model, [prompt_ids(tok, p, fmt) for p in chunk for _ in range(chains)], gen,
                          generator=generator)
        rows = [(read_answer(tok.decode(t.tolist())), steps) for t, steps in zip(res.tokens, res.forwards)]
        out += [rows[j * chains:(j + 1) * chains] for j in range(len(chunk))]
        now, done = time.time(), len(out)
        if done < len(puzzles) and (live or now - last >= PROGRESS_SECONDS):
            rate = done / (now - t0)
            line = (f"  {label}: {done}/{len(puzzles)} puzzles | {rate:.1f} puzzles/s | "
                    f"ETA {(len(puzzles) - done) / rate / 60:.1f} min")
            print(line, end="\r" if live else "\n", file=sys.stderr, flush=True)
            last = now
    if live and len(puzzles) > per_call:
        print(" " * 80, end="\r", file=sys.stderr, flush=True)  # clear the live line
    return out


@torch.no_grad()
def evaluate(model, tok, fmt, puzzles, max_steps=48, batch_size=256, seed=0, gen_overrides=None, attempts=1,
             checkpoint=None):
    """Solves puzzles (81-char strings) in batches. Returns a dict with per-puzzle records and totals.

    attempts: denoising chains per puzzle at most. Chain 0 runs for every puzzle (draw for draw what
    attempts=1 runs); the other attempts-1 chains run side by side afterwards, only for the puzzles that
    chain 0 did not solve, and pick_attempt chooses among them. The result is the same rule as running all
    chains and keeping the first valid one, at a fraction of the compute when most puzzles are solved at once.
    batch_size: rows (chains) per generate call, about.
    checkpoint: a folder whose generation_config.json sets the sampler (entropy bound, temperatures,
    stopping); None: the defaults. The canvas length, max_steps and the stop tokens are always evaluate's,
    and gen_overrides win over all of them.
    """
    device = model.embed_tokens.weight.device
    gen = dg.GenerationConfig.from_pretrained(checkpoint, **{
        "max_new_tokens": model.cfg.canvas_length if fmt == "compact" else 256, "max_denoising_steps": max_steps,
        "eos_token_id": [1] if fmt == "compact" else [1, 106, 50], **(gen_overrides or {})})
    g = torch.Generator(device=device).manual_seed(seed)
    t0 = time.time()
    chains = run_chains(model, tok, fmt, puzzles, 1, gen, g, batch_size, "chain 0")  # chain 0 of every puzzle
    retry = [i for i, p in enumerate(puzzles) if not is_valid_solution(chains[i][0][0], p)]
    if attempts > 1 and retry:
        more = run_chains(model, tok, fmt, [puzzles[i] for i in retry], attempts - 1, gen, g, batch_size,
                          f"{attempts - 1} more chains for the {len(retry)} unsolved")
        for i, extra in zip(retry, more):
            chains[i] = chains[i] + extra
    records = []
    for p, runs in zip(puzzles, chains):
        grids = [grid for grid, _ in runs]
        k = pick_attempt(grids, p)
        grid = grids[k]
        clues_kept = grid is not None and all(c == "0" or c == d for c, d in zip(p, grid))
        records.append(dict(puzzle=p, output=grid, steps=runs[k][1], solved=is_valid_solution(grid, p),
                            clues_kept=clues_kept, attempt=k, chains=len(runs),
                            valid_chains=sum(is_valid_solution(x, p) for x in grids)))
    seconds = time.time() - t0
    steps = [r["steps"] for r in records]
    return dict(records=records, n=len(records), solved=sum(r["solved"] for r in records), seconds=seconds,
                attempts=attempts, mean_steps=float(np.mean(steps)) if steps else 0.0,
                median_steps=float(np.median(steps)) if steps else 0.0)


def clue_bucket(clues):
    return "17-24" if clues <= 24 else "25-29" if clues <= 29 else "30-39" if clues <= 39 else "40+"


def report(res, grades):
    """Prints the solve rate with its 95% interval, by difficulty and by clue count, and the step counts
    (of the chosen chains). With several chains, also chain 0's rate alone: the gain of the rule check."""
    def rate(name, k, n):
        lo, hi = wilson(k, n)
        return f"{name:<22} {k:>5}/{n:<5} {100 * k / max(n, 1):6.1f}%  [{100 * lo:5.1f}, {100 * hi:5.1f}]"

    def line(name, recs):
        steps = [r["steps"] for r in recs]
        return (rate(name, sum(r["solved"] for r in recs), len(recs))
                + f"  steps mean {np.mean(steps):5.1f} median {np.median(steps):4.0f}")
    recs = res["records"]
    print(f"{chains_label(res['attempts']):<22} {'solved':>11}  {'rate':>6}   95% interval")
    print(line("all", recs))
    if res["attempts"] > 1:
        print(rate("all, chain 0 alone", first_chain_solved(recs), len(recs)))
    for g in GRADES:
        sub = [r for r, gr in zip(recs, grades) if gr == g]
        if sub:
            print(line(f"grade {g}", sub))
    for b in ("40+", "30-39", "25-29", "17-24"):
        sub = [r for r in recs if clue_bucket(sum(c != "0" for c in r["puzzle"])) == b]
        if sub:
            print(line(f"clues {b}", sub))
    kept = sum(r["clues_kept"] for r in recs)
    parsed = sum(r["output"] is not None for r in recs)
    print(f"clues preserved {kept}/{len(recs)} | parsed {parsed}/{len(recs)} | "
          f"{len(recs) / res['seconds']:.1f} puzzles/s")


def read_puzzle_file(path):
    """One puzzle per line (81 chars, '.' or '0' for blanks; anything after whitespace or a comma ignored).
    A first line of letters without digits is a CSV header ("quizzes,solutions", as in Kaggle's Sudoku sets) and
    skipped."""
    if not os.path.isfile(path):
        raise dg.DiffusionGemmaError(f"puzzle file {path!r} does not exist")
    puzzles = []
    with open(path, encoding="utf-8-sig") as f:  # (-sig: a byte-order mark is not a cell)
        for i, line in enumerate(f, 1):
            header = i == 1 and any(ch.isalpha() for ch in line) and not any(ch.isdigit() for ch in line)
            if header or not line.strip():
                continue
            try:
                puzzles.append(parse_puzzle(line))
            except ValueError as e:
                raise dg.DiffusionGemmaError(f"{path} line {i}: {e}") from None
    if not puzzles:
        raise dg.DiffusionGemmaError(f"{path} holds no puzzles")
    return puzzles


def grade_file(path, puzzles):
    """The grade of each puzzle of a file, or one clear error naming a puzzle whose clues admit no solution
    (they contradict each other through the grid, not inside one row, column or box)."""
    try:
        return _batch_grade(puzzles)
    except ValueError:
        for i, p in enumerate(puzzles, 1):
            try:
                grade(p)
            except ValueError:
                raise dg.DiffusionGemmaError(f"{path} puzzle {i} ({p}) has no solution: its clues contradict each "
                                             f"other; fix it or drop it") from None
        raise


def eval_only(args):
    """Evaluates a checkpoint on one or more puzzle files, at one or more step limits."""
    device = dg.resolve_device(args.device)
    ckpt = args.checkpoint or BUNDLED
    if not os.path.isfile(os.path.join(ckpt, "sudoku.json")):
        raise dg.DiffusionGemmaError(f"{ckpt!r} is not a Sudoku checkpoint (no sudoku.json); train one with "
                                     f"train_sudoku.py or omit --checkpoint for the bundled one")
    attempts = read_attempts(args.attempts, ckpt)
    step_limits = args.max_steps or [dg.GenerationConfig.from_pretrained(ckpt).max_denoising_steps]
    files = {path: read_puzzle_file(path) for path in args.puzzles}
    grades = {path: grade_file(path, puzzles) for path, puzzles in files.items()}  # bad puzzles fail here, early
    model = dg.DiffusionGemma.from_pretrained(ckpt, device=device,
                                              dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if device.startswith("cuda"):
        model.set_experts_impl("grouped")
    tok, fmt = dg.Tokenizer.from_pretrained(ckpt), read_meta(ckpt)["format"]
    summary, records = [], []
    for path, puzzles in files.items():
        for max_steps in step_limits:
            print(f"\n{len(puzzles)} puzzles from {path}; checkpoint {ckpt}; max {max_steps} steps; {device}")
            res = evaluate(model, tok, fmt, puzzles, max_steps=max_steps, batch_size=args.eval_batch, seed=args.seed,
                           attempts=attempts, checkpoint=ckpt)
            report(res, grades[path])
            lo, hi = wilson(res["solved"], res["n"])
            summary.append((os.path.basename(path), max_steps, res["solved"], first_chain_solved(res["records"]),
                            res["n"], lo, hi, res["mean_steps"]))
            if max_steps == step_limits[0]:
                records += [dict(puzzle=r["puzzle"], output=r["output"], steps=r["steps"], solved=r["solved"],
                                 attempt=r["attempt"], valid_chains=r["valid_chains"], grade=gr)
                            for r, gr in zip(res["records"], grades[path])]
    if len(summary) > 1:
        print("\n| puzzles | chains | max steps | solved | 95% interval | mean steps |\n|---|---|---|---|---|---|")
        for name, steps, k, k0, n, lo, hi, mean in summary:
            alone = f" (chain 0 alone: {100 * k0 / n:.1f}%)" if attempts > 1 else ""
            print(f"| {name} | {chains_label(attempts)} | {steps} | {k}/{n} = {100 * k / n:.1f}%{alone} | "
                  f"{100 * lo:.1f}-{100 * hi:.1f}% | {mean:.1f} |")
    if args.out:
        lines = "".join(json.dumps(r) + "\n" for r in records)
        dg.atomic_write(args.out, lambda f: f.write(lines))
        print(f"wrote {args.out}")
    return summary


# =============================================================================
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sudoku-small",
                   help=f"model preset to train from scratch: {', '.join(dg.PRESETS)}")
    p.add_argument("--init-from", help="fine-tune this Hugging Face DiffusionGemma checkpoint "
                                          "(chat format; a Sudoku checkpoint keeps its own)")
    p.add_argument("--resume", help="continue a run from a checkpoint it saved (exactly where it stopped)")
    p.add_argument("--out", help="training: the checkpoint folder (default runs/sudoku); --eval-only: a JSONL "
                                 "file of per-puzzle results")
    p.add_argument("--export", help="also write the final model here in bf16, without optimizer state")
    p.add_argument("--steps", type=int, help="optimizer steps (default 800)")
    p.add_argument("--max-minutes", type=float,
                   help="a ceiling on the run's wall time: after step 30, --steps shrinks (the schedule with it) if "
                        "the measured pace would end the run later. Default: 9.5 when neither --steps nor "
                        "--time-budget is given (the CPU demo's 10 minutes), else none")
    p.add_argument("--stop-after", type=int, help="save and stop after this many steps, as Ctrl-C would")
    p.add_argument("--stop-after-minutes", type=float,
                   help="save and stop after this much wall time (for time-limited jobs; continue with --resume)")
    p.add_argument("--time-budget", type=float, help="minutes: size --steps from the speed of steps 10-30")
    p.add_argument("--batch-size", type=int, default=16, help="puzzles per step (over all GPUs)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=50, help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--sc-prob", type=float, default=0.5, help="share of examples trained with self-conditioning")
    p.add_argument("--ar-weight", type=float, default=1.0, help="weight of the encoder's autoregressive co-loss")
    p.add_argument("--train-puzzles", type=int, default=20000, help="distinct generated training puzzles")
    p.add_argument("--grades", type=lambda s: s.split(","),
                   help=f"train only on the generated puzzles of these grades, comma-separated ({', '.join(GRADES)}; "
                        f"default: all)")
    p.add_argument("--data-dir", default=os.path.join(HERE, "data"), help="cache of generated puzzles")
    p.add_argument("--workers", type=int, help="processes for puzzle generation (default: all cores)")
    p.add_argument("--seed", type=int, default=0,
                   help="training puzzles, initialisation and draws (the short CPU demo is sensitive to it: README.md)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the layers for training (auto: on GPU, and on CPU when a C++ compiler is found)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=1000,
                   help="steps between validation solves, and one at the end (0: never)")
    p.add_argument("--eval-puzzles", type=int, default=128, help="validation puzzles per evaluation")
    p.add_argument("--eval-batch", type=int, default=256,
                   help="puzzles solved together (with --attempts K: about this many rows, K per puzzle)")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on --puzzles and exit")
    p.add_argument("--checkpoint", help="checkpoint for --eval-only (default: the bundled one)")
    p.add_argument("--puzzles", nargs="+", help="for --eval-only: files of puzzles, one per line (81 cells, "
                        "'.' or '0' for blanks; anything after whitespace or a comma ignored)")
    p.add_argument("--max-steps", type=int, nargs="+",
                   help="for --eval-only: maximum denoising steps (several values: a solve-rate-vs-steps table; "
                        "default: the checkpoint's generation_config.json, else 48)")
    p.add_argument("--attempts", type=int,
                   help="for --eval-only: denoising chains per puzzle, run together; a check of the Sudoku rules "
                        "keeps a valid one (not a solver; K times the compute). Default: \"attempts\" in the "
                        "checkpoint's sudoku.json, else 1")
    p.add_argument("--make-test-sets", metavar="DIR",
                   help="write fresh held-out puzzle files (1,000 per bucket, and easy sets of 36, 40 and 45 clues)")
    args = p.parse_args(argv)
    if args.eval_only and not args.puzzles:
        p.error("--eval-only needs --puzzles FILE")
    if not args.eval_only and not args.out:
        args.out = os.path.join(HERE, "runs", "sudoku")
    if args.max_minutes is None and args.steps is None and args.time_budget is None:
        args.max_minutes = 9.5  # the CPU demo: 800 steps where they fit in 10 minutes, fewer where not
    if args.steps is None:
        args.steps = 800
    return args


def check_args(args):
    """One clear error line for a setting that makes no sense (a number out of range, an output path of the
    wrong kind), before any work starts."""
    positive = ["steps", "batch_size", "lr", "clip", "train_puzzles", "log_every", "eval_batch"]
    optional_positive = ["stop_after", "time_budget", "max_minutes", "workers"]  # None: unset
    non_negative = ["warmup", "weight_decay", "ar_weight", "eval_every", "eval_puzzles", "save_every",
                    "stop_after_minutes"]  # --stop-after-minutes 0: stop after the first step
    for name in positive + [n for n in optional_positive if getattr(args, n) is not None]:
        if not getattr(args, name) > 0:
            raise dg.DiffusionGemmaError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(args, name)})")
    for name in [n for n in non_negative if getattr(args, n) is not None]:
        if not getattr(args, name) >= 0:
            raise dg.DiffusionGemmaError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})")
    unknown = [g for g in args.grades or [] if g not in GRADES]
    if unknown:
        raise dg.DiffusionGemmaError(f"--grades: unknown grade {unknown[0]!r}; choose from {', '.join(GRADES)}")
    if not 0 <= args.sc_prob <= 1:
        raise dg.DiffusionGemmaError(f"--sc-prob is a share of the examples, from 0 to 1 (got {args.sc_prob})")
    # output paths, checked now rather than after minutes of training or solving
    if args.eval_only:
        if args.out and (os.path.isdir(args.out) or not os.path.isdir(os.path.dirname(os.path.abspath(args.out)))):
            raise dg.DiffusionGemmaError(f"--out {args.out!r} must be a file path in an existing folder "
                                         "(the JSONL of results)")
        return
    for flag, path in (("--out", args.out), ("--export", args.export), ("--make-test-sets", args.make_test_sets)):
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise dg.DiffusionGemmaError(f"{flag} {path!r} is a file; it must be a folder (new or existing)")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    if args.make_test_sets:
        return make_test_sets(args.make_test_sets, workers=args.workers)
    if args.eval_only:
        return eval_only(args)
    model = train(args)
    end_distributed()
    return model


if __name__ == "__main__":
    try:
        main()
    except (dg.DiffusionGemmaError, ValueError) as e:
        sys.exit(f"error: {e}")
