#!/usr/bin/env python3
"""Fails when the Rust modules of core/src import each other in a circle.

Each file of core/src is one module (`relay/cluster/mod.rs` is `relay::cluster`, inline modules
such as `mod tests { … }` belong to their file; `bin/` holds separate crates and is skipped). A
module A depends on B when A names a path into B: in a `use` (`crate::…`, `super::…`, `self::…`,
or a child module's name) or inline in the code (`crate::relay::route::open_to_listener(…)`,
`metrics::Refusal`). A path resolves to the longest module it names. A module naming its own
ancestor is not counted: a child is part of its parent (`super::RelayState` is how a relay room
reaches the relay's shared state), and a parent naming its child is.

Every strongly connected group of two or more modules is a circle; it is printed with the paths
that tie it (file:line). Circles listed in scripts/import-circles.allow (one a line, the modules
separated by `<->`, `#` comments) are reported but do not fail. Exit 0 when every circle is
allowed (and each allowed one still exists), 1 otherwise.

    python3 scripts/check-import-circles.py [--root core/src] [--allow scripts/import-circles.allow]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

WORD = r"[A-Za-z_][A-Za-z0-9_]*"


def module_of(path: Path, root: Path) -> tuple[str, ...] | None:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts
    if parts and parts[0] == "bin":
        return None
    if parts in (("lib",), ("main",)):
        return ()
    if parts[-1] == "mod":
        return tuple(parts[:-1])
    return tuple(parts)


def strip(text: str) -> str:
    """Comments and string/char literals blanked out (newlines kept, so line numbers hold)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
            continue
        m = re.compile(r'b?r(#*)"').match(text, i) if c in "br" and (i == 0 or not re.match(r"\w", text[i - 1])) else None
        if m:
            end = text.find('"' + m.group(1), m.end())
            j = n if end < 0 else end + 1 + len(m.group(1))
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
            continue
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(re.sub(r"[^\n]", " ", text[i : j + 1]))
            i = j + 1
            continue
        m = re.compile(r"'(\\.[^']*|[^'\\\n])'").match(text, i) if c == "'" else None
        if m:
            out.append(" " * (m.end() - i))
            i = m.end()
            continue
        out.append(c)
        i += 1
    return "".join(out)


def drop_test_modules(code: str) -> str:
    """`#[cfg(test)] mod x { … }` blanked out: tests are not part of the module graph."""
    for m in reversed(list(re.finditer(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod\s+" + WORD + r"\s*\{", code))):
        depth, j = 0, m.end() - 1
        while j < len(code):
            if code[j] == "{":
                depth += 1
            elif code[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        code = code[: m.start()] + re.sub(r"[^\n]", " ", code[m.start() : j + 1]) + code[j + 1 :]
    return code


def use_paths(tree: str) -> list[list[str]]:
    """The paths of one use tree (`a::{b, c::{d, e as f}, self}`), as lists of segments."""
    tree = re.sub(r"\s+", "", tree)

    def parse(s: str, prefix: list[str]) -> list[list[str]]:
        depth, start, items = 0, 0, []
        for k, ch in enumerate(s):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                items.append(s[start:k])
                start = k + 1
        items.append(s[start:])
        paths = []
        for item in filter(None, items):
            brace = item.find("{")
            if brace >= 0:
                head = [p for p in item[:brace].split("::") if p]
                paths += parse(item[brace + 1 : item.rfind("}")], prefix + head)
            else:
                segs = [p for p in re.sub(r"as\w+$", "", item.split(" as ")[0]).split("::") if p]
                segs = [p for p in segs if p != "*"]
                if segs == ["self"]:
                    segs = []
                paths.append(prefix + segs)
        return paths

    return parse(tree, [])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = Path(__file__).resolve().parent
    ap.add_argument("--root", default=str(here.parent / "core" / "src"))
    ap.add_argument("--allow", default=str(here / "import-circles.allow"))
    args = ap.parse_args()
    root = Path(args.root)

    files = {}
    for f in sorted(root.rglob("*.rs")):
        mod = module_of(f, root)
        if mod is not None:
            files[mod] = f
    modules = set(files)

    def resolve(segs: list[str], here: tuple[str, ...]) -> tuple[str, ...] | None:
        if not segs:
            return None
        base: tuple[str, ...]
        if segs[0] == "crate":
            base, rest = (), segs[1:]
        elif segs[0] in ("super", "self"):
            base, rest = here, segs
            while rest and rest[0] in ("super", "self"):
                base = base[:-1] if rest[0] == "super" else base
                rest = rest[1:]
        elif here + (segs[0],) in modules:
            base, rest = here, segs
        else:
            return None  # another crate, or a local name
        best = base
        for k in range(1, len(rest) + 1):
            if base + tuple(rest[:k]) in modules:
                best = base + tuple(rest[:k])
            else:
                break
        if best == here[: len(best)]:
            return None  # itself or an ancestor
        return best

    edges: dict[tuple[str, ...], dict[tuple[str, ...], list[str]]] = {m: {} for m in modules}
    for mod, f in files.items():
        code = drop_test_modules(strip(f.read_text(encoding="utf-8")))
        line_of = lambda pos: code.count("\n", 0, pos) + 1  # noqa: E731
        where = f"{f.relative_to(root.parent.parent) if root.parent.parent in f.parents else f}"
        spans = []
        for m in re.finditer(r"\buse\s+([^;]+);", code):
            spans.append((m.start(), m.end()))
            for segs in use_paths(m.group(1)):
                target = resolve(segs, mod)
                if target:
                    edges[mod].setdefault(target, []).append(f"{where}:{line_of(m.start())}")
        for m in re.finditer(r"\b(" + WORD + r")((?:::" + WORD + r")+)", code):
            if any(a <= m.start() < b for a, b in spans):
                continue
            if m.start() > 0 and code[m.start() - 1] == ":":
                continue
            segs = [m.group(1)] + [s for s in m.group(2).split("::") if s]
            target = resolve(segs, mod)
            if target:
                edges[mod].setdefault(target, []).append(f"{where}:{line_of(m.start())}")

    # Tarjan's strongly connected components.
    index: dict = {}
    low: dict = {}
    stack: list = []
    on: set = set()
    groups: list[list[tuple[str, ...]]] = []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in sorted(modules):
        if v not in index:
            visit(v)

    name = lambda m: "::".join(m) or "crate"  # noqa: E731
    allowed = {}
    allow_path = Path(args.allow)
    if allow_path.exists():
        for raw in allow_path.read_text(encoding="utf-8").splitlines():
            line = raw.split("#")[0].strip()
            if line:
                allowed[frozenset(p.strip() for p in line.split("<->"))] = line

    failed = False
    unallowed = False
    seen = set()
    for g in groups:
        key = frozenset(name(m) for m in g)
        seen.add(key)
        verdict = "allowed (scripts/import-circles.allow)" if key in allowed else "NOT ALLOWED"
        unallowed |= key not in allowed
        failed |= key not in allowed
        print(f"import circle ({verdict}): {' <-> '.join(name(m) for m in g)}")
        members = set(g)
        for a in g:
            for b, at in sorted(edges[a].items()):
                if b in members:
                    at = list(dict.fromkeys(at))
                    print(f"  {name(a)} -> {name(b)}: {', '.join(at[:3])}{' …' if len(at) > 3 else ''}")
    for key, line in allowed.items():
        if key not in seen:
            print(f"scripts/import-circles.allow lists {line!r}, which is no longer a circle: remove the line")
            failed = True
    if not groups:
        print(f"no import circle among the {len(modules)} modules of {root}")
    elif unallowed:
        print("cut each circle that is not allowed: move what both sides need into a module of its own, or turn the dependency around")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
