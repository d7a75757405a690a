#!/usr/bin/env python3
"""Deterministic data set for bench/ingest.

    datagen.py generate DIR --size-mb N [--files 200] [--seed S]
    datagen.py mutate DIR [--percent 1] [--block 65536] [--seed S]

`generate` writes about `--files` files totalling exactly N MiB: half of the bytes are
incompressible (seeded PRNG output), half realistic text (log lines and source-like
code built from word lists, compressing 3-5x with zstd). `mutate` overwrites 64 KiB
blocks at scattered offsets across all files so that `--percent` of the data set's
bytes change; text files get new text, binary files new random bytes. Both are pure
functions of their arguments: same arguments, same bytes, on every machine.
"""

import argparse
import bisect
import os
import random
import sys

WORDS = (
    "account active admin agent alpha append archive backup batch beta bucket cache "
    "catalog chunk client cluster commit config connect context coordinator copy cursor "
    "daemon data delete deploy digest disk drain drill entry error event expire export "
    "fetch file flush frame gateway handle header health index ingest inode journal key "
    "label latency lease level limit listen load lock manifest merge metric mirror mount "
    "node object offset open pack page parse partition patch peer pending policy pool "
    "prune queue quota read record region release replica request resolve restore retry "
    "route scan schedule schema seal segment server session shard signal snapshot socket "
    "source stage state status storage stream sync table target task tenant thread token "
    "trace update upload user value verify version volume wait window worker write zone"
).split()
SERVICES = ["api", "auth", "billing", "catalog", "gateway", "ingest", "scheduler", "search", "store", "worker"]
LEVELS = ["INFO"] * 12 + ["DEBUG"] * 6 + ["WARN"] * 2 + ["ERROR"]
METHODS = ["GET", "GET", "GET", "POST", "PUT", "DELETE"]
STATUS = [200] * 20 + [201, 204, 304, 400, 404, 409, 500, 503]
TYPES = ["u64", "usize", "String", "Vec<u8>", "Option<u32>", "bool", "&str", "Bytes", "Duration"]
KEYWORDS = ["let", "let mut", "if", "match", "return", "for", "while"]

MIB = 1 << 20
BLOCK = 64 << 10


def log_lines(rng, n, t):
    """n log lines starting at time t (seconds); returns (lines, t)."""
    out = []
    ch, ri, rb = rng.choice, rng.randint, rng.getrandbits
    for _ in range(n):
        t += rng.expovariate(40.0)
        s = int(t)
        svc = ch(SERVICES)
        words = " ".join(rng.choices(WORDS, k=ri(2, 7)))
        out.append(
            f"2024-{1 + s // 2592000 % 12:02d}-{1 + s // 86400 % 28:02d}T{s // 3600 % 24:02d}:{s // 60 % 60:02d}:"
            f"{s % 60:02d}.{int(t * 1000) % 1000:03d}Z {ch(LEVELS):<5} {svc}[{1000 + rb(12)}]: {words} "
            f"req={rb(64):016x} {ch(METHODS)} /{svc}/{ch(WORDS)}/{rb(20)} status={ch(STATUS)} "
            f"latency_ms={int(rng.lognormvariate(3, 1))} bytes={rb(rng.randint(4, 20))} user={ch(WORDS)}{rb(8)}\n"
        )
    return out, t


def code_lines(rng, n):
    out = []
    ch, ri = rng.choice, rng.randint
    depth = 1
    for _ in range(n):
        r = rng.random()
        ind = "    " * depth
        if r < 0.08 and depth < 5:
            out.append(f"{ind}fn {ch(WORDS)}_{ch(WORDS)}(&self, {ch(WORDS)}: {ch(TYPES)}) -> Result<{ch(TYPES)}, Error> {{\n")
            depth += 1
        elif r < 0.16 and depth > 1:
            depth -= 1
            out.append("    " * depth + "}\n")
        elif r < 0.24:
            out.append(f"{ind}// {' '.join(rng.choices(WORDS, k=ri(3, 12)))}.\n")
        elif r < 0.28:
            out.append("\n")
        else:
            out.append(
                f"{ind}{ch(KEYWORDS)} {ch(WORDS)}_{ch(WORDS)} = self.{ch(WORDS)}.{ch(WORDS)}"
                f"({ch(WORDS)}, {ri(0, 4096)}).{ch(WORDS)}()?;\n"
            )
    return out


def text_bytes(rng, size, code):
    """Exactly `size` bytes of text."""
    parts, have, t = [], 0, rng.random() * 1e7
    while have < size:
        lines = code_lines(rng, 2000) if code else log_lines(rng, 2000, t)
        if not code:
            lines, t = lines
        chunk = "".join(lines).encode()
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)[:size]


def layout(size_mb, files, seed):
    """[(relative path, size, is_text)] sorted by path; sizes add up to exactly size_mb MiB."""
    rng = random.Random(f"layout-{seed}")
    total = size_mb * MIB
    nbin, ntext = files // 2, files - files // 2
    out = []
    for kind, n, share in (("bin", nbin, total // 2), ("text", ntext, total - total // 2)):
        weights = [rng.lognormvariate(0, 0.9) for _ in range(n)]
        scale = share / sum(weights)
        sizes = [max(1, int(w * scale)) for w in weights]
        sizes[-1] += share - sum(sizes)
        for i, sz in enumerate(sizes):
            if kind == "bin":
                path = f"blobs/g{i % 8}/object-{i:03d}.bin"
            elif i % 2 == 0:
                path = f"logs/{SERVICES[i % len(SERVICES)]}/app-{i:03d}.log"
            else:
                path = f"src/{WORDS[i % len(WORDS)]}/mod_{i:03d}.rs"
            out.append((path, sz, kind == "text"))
    return sorted(out)


def content(path, size, is_text, seed, tag):
    rng = random.Random(f"{tag}-{seed}-{path}")
    if is_text:
        return text_bytes(rng, size, path.endswith(".rs"))
    return rng.randbytes(size)


def generate(args):
    os.makedirs(args.dir, exist_ok=True)
    entries = layout(args.size_mb, args.files, args.seed)
    for path, size, is_text in entries:
        full = os.path.join(args.dir, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(content(path, size, is_text, args.seed, "file"))
    total = sum(s for _, s, _ in entries)
    text = sum(s for _, s, t in entries if t)
    print(f"generated {len(entries)} files, {total} bytes ({text} text, {total - text} incompressible) in {args.dir}")


def mutate(args):
    entries = layout(args.size_mb, args.files, args.seed)
    starts, pos = [], 0
    for _, size, _ in entries:
        starts.append(pos)
        pos += size
    total = pos
    nblocks = max(1, round(total * args.percent / 100 / args.block))
    stride = total / nblocks
    rng = random.Random(f"mutate-{args.seed}")
    # One block per stride of the concatenated files: scattered, and never overlapping
    # unless a block has to be pulled back inside a file smaller than the stride.
    changes = {}
    for k in range(nblocks):
        g = int(k * stride + rng.random() * max(0, stride - args.block))
        i = bisect.bisect_right(starts, g) - 1
        path, size, is_text = entries[i]
        off = max(0, min(g - starts[i], size - args.block))
        changes.setdefault(i, []).append((off, min(args.block, size)))
    changed = 0
    for i, blocks in sorted(changes.items()):
        path, size, is_text = entries[i]
        with open(os.path.join(args.dir, path), "r+b") as f:
            for n, (off, length) in enumerate(blocks):
                f.seek(off)
                f.write(content(f"{path}#{n}", length, is_text, args.seed, "mutate"))
                changed += length
    print(
        f"mutated {nblocks} blocks of {args.block} bytes in {len(changes)} files: "
        f"{changed} bytes ({100 * changed / total:.2f}% of {total})"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("generate", "mutate"):
        s = sub.add_parser(name)
        s.add_argument("dir")
        s.add_argument("--size-mb", type=int, required=True)
        s.add_argument("--files", type=int, default=200)
        s.add_argument("--seed", type=int, default=20240601)
        if name == "mutate":
            s.add_argument("--percent", type=float, default=1.0)
            s.add_argument("--block", type=int, default=BLOCK)
    args = p.parse_args()
    if args.size_mb <= 0 or args.files < 2:
        sys.exit("--size-mb must be positive and --files at least 2")
    generate(args) if args.cmd == "generate" else mutate(args)


if __name__ == "__main__":
    main()
