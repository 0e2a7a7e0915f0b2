#!/usr/bin/env python3
"""The code blocks of every README and of every page under docs/, for the tests that run them
as pasted.

A block is a fenced block with a language (```python, ```js, ```c, ```sh, ```rust); a fence
without one, or marked ```text, is program output or a diagram, not code. What runs each language:
- rust: README.md and the docs pages with Rust blocks are doctest modules of the core (the
  ``include_str!`` list next to ``ReadmeDoctests`` in core/src/lib.rs, which ``check`` reads),
  so ``cargo test -p libtunnel`` compiles each of their Rust blocks as pasted (lines starting
  with ``# `` are rustdoc's hidden lines: the async wrapper); an unlabelled fence there would be
  compiled as Rust, hence ```text for output and diagrams;

- python: bindings/python/tests/test_readme.py (scripts/test-python.sh), each block its own
  process against a test relay and PostgreSQL: exit 0 and nothing on stderr;
- c: ffi/tests/c.rs (scripts/test-c.sh) writes them with ``readme_blocks.py c``, compiles each
  with the installed pkg-config flags and runs it against a relay: exit 0, nothing on stderr;
- sh: ``python3 scripts/readme_blocks.py sh PAGE|DIR/...`` runs the blocks marked ``run``,
  ``serve``, ``transcript`` or ``terminal`` with bash, ``set -euo pipefail``: scripts/test-c.sh
  those of README.md, ffi/README.md, docs/ and bench/README.md (with the CLI built), scripts/test-python.sh and scripts/test-node.sh those of
  their bindings' READMEs (in their virtualenv / with the addon built);
- js: the Node tests (bindings/node/test/cli.test.js) run the example file a block shows.

A block that is not run as it stands says so on the line before its fence, in an HTML comment
the renderer hides:

    <!-- readme-test: run -->                 (sh) run by this script; ``run (app.c: the c block
                                              above)`` (or below) first saves that block as app.c
    <!-- readme-test: serve until "TEXT" -->   (sh) starts a server: run in a network namespace of
                                              its own until it prints TEXT, then stopped
    <!-- readme-test: transcript -->          (sh) ``$ COMMAND`` lines, each followed by the
                                              output it must print (``…`` matches any text, and
                                              within a key, as ``0mB1…=``, any base64)
    <!-- readme-test: terminal N of GROUP until "TEXT" -->   (sh) one of several terminals (or
                                              hosts) a reader runs at once; see run_group: the
                                              group runs in network, mount and PID namespaces
                                              of its own, where relay.example.com, db.internal
                                              … are loopback; ``until`` waits for a long-running
                                              one to print TEXT, without it the block must exit
                                              0 with nothing on stderr
    <!-- readme-test: setup GROUP                 a hidden script (lines up to ``-->``): the
    …script…                                       machines the page assumes (relay, database,
    -->                                            keys; scripts/readme_setup.sh); ``check GROUP``
                                              likewise runs after the terminals
    <!-- readme-test: same as examples/node/expose.js -->   the block is that file, to the
                                              letter, and a test runs the file
    <!-- readme-test: not run: REASON -->     never run; REASON says why and what covers it

``python3 scripts/readme_blocks.py check`` fails when a code block has neither a runner for its
language nor a mark, when a group is malformed, and when a relative link names a file or heading
that does not exist. ``group NAME`` runs one group. Placeholders a reader fills in (the relay URL, the key, the private
database's address) are replaced by :func:`fill` from the one table below, nothing else.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Directories whose READMEs are not the project's (tools, dependencies, build output).
SKIP_DIRS = {".git", "target", "node_modules", ".tools", "dist", "results"}

# Languages with a runner (see the module doc); others need a mark.
RUNNERS = {"python", "c", "rust"}

# How long a served block may take to print what its mark waits for (seconds).
SERVE_LIMIT = float(os.environ.get("README_SERVE_LIMIT", "120"))

MARK = re.compile(r"^\s*<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
# ``terminal N of GROUP`` and ``terminal N of GROUP until "TEXT"`` (see :func:`run_group`).
TERMINAL = re.compile(r'terminal (\d+) of ([\w-]+)(?: until "(.*)")?')
# A hidden step of a group: ``<!-- readme-test: setup GROUP`` (or ``check GROUP``), a script on the
# following lines, ``-->``.
HIDDEN = re.compile(r"^\s*<!--\s*readme-test:\s*(setup|check) ([\w-]+)\s*$")


@dataclass
class Block:
    readme: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    mark: str  # "" when unmarked

    @property
    def where(self) -> str:
        return f"{self.readme.relative_to(ROOT)}:{self.line}"


def readmes() -> list[Path]:
    """Every page whose code blocks must run: each README.md, and every page under docs/."""
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        under_docs = Path(dirpath).is_relative_to(ROOT / "docs")
        found += [Path(dirpath) / f for f in filenames if f == "README.md" or (under_docs and f.endswith(".md"))]
    return sorted(found)


def doctest_pages() -> set[Path]:
    """The pages core/src/lib.rs includes as doctest modules (``#[doc = include_str!(…)]``):
    cargo test compiles their Rust blocks."""
    lib = ROOT / "core" / "src" / "lib.rs"
    return {(lib.parent / m).resolve() for m in re.findall(r'include_str!\("([^"]+\.md)"\)', lib.read_text())}


def blocks(readme: Path) -> list[Block]:
    lines = readme.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2)
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        body = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1 : j]) + "\n"
        mark = MARK.match(lines[i - 1]) if i > 0 else None
        out.append(Block(readme, i + 1, lang, body, mark.group(1) if mark else ""))
        i = j + 1
    return out


@dataclass
class Hidden:
    readme: Path
    line: int
    kind: str  # "setup" or "check"
    group: str
    text: str


def hidden(readme: Path) -> list[Hidden]:
    lines = readme.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        m = HIDDEN.match(line)
        if m:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "-->"), None)
            if end is None:
                raise SystemExit(f"{readme.relative_to(ROOT)}:{i + 1}: a hidden {m.group(1)} without its closing -->")
            out.append(Hidden(readme, i + 1, m.group(1), m.group(2), "\n".join(lines[i + 1 : end]) + "\n"))
    return out


@dataclass
class Group:
    """Blocks a reader runs at once in several terminals (or on several hosts), with the hidden
    setup that stands in for the machines the page assumes and the hidden check of the result."""

    readme: Path
    terminals: list[Block]
    hidden: list[Hidden]

    @property
    def where(self) -> str:
        line = min([b.line for b in self.terminals] + [h.line for h in self.hidden])
        return f"{self.readme.relative_to(ROOT)}:{line}"

    def step(self, kind: str) -> str:
        return "".join(h.text for h in self.hidden if h.kind == kind)


def groups() -> dict[str, Group]:
    out: dict[str, Group] = {}
    for r in readmes():
        for b in blocks(r):
            m = TERMINAL.fullmatch(b.mark)
            if m:
                out.setdefault(m.group(2), Group(r, [], [])).terminals.append(b)
        for h in hidden(r):
            out.setdefault(h.group, Group(r, [], [])).hidden.append(h)
    return out


def code_blocks(lang: str | None = None) -> list[Block]:
    return [b for r in readmes() for b in blocks(r) if b.lang and b.lang != "text" and (lang is None or b.lang == lang)]


# What a reader fills in, as the READMEs write it: relay URLs, keys, the private database.
RELAYS = ("ws://relay.example.com:7835", "wss://relay.example.com", "ws://relay:7835", "ws://127.0.0.1:7835")
KEYS = ('"1:…"', "1:0mB1…=", "1:c2VjcmV0LWtleS1mcm9tLXR1bm5lbC1rZXlnZW4=")
DB = "db.internal:5432"


def fill(text: str, *, relay: str, key: str, db: str) -> str:
    """The block with its placeholders filled in: what a reader replaces before running it."""
    for url in RELAYS:
        text = text.replace(url, relay)
    for k in KEYS:
        text = text.replace(k, f'"{key}"' if k.startswith('"') else key)
    return text.replace(DB, db)


def problems() -> list[str]:
    """Code blocks nothing runs and nothing marks, and marks that do not hold."""
    bad = []
    for b in code_blocks():
        if b.mark.startswith("not run: "):
            continue
        if b.mark.startswith("same as "):
            file = b.mark.removeprefix("same as ").strip()
            if b.text != (ROOT / file).read_text():
                bad.append(f"{b.where}: the block differs from {file}")
        elif b.mark.split(" ", 1)[0] in ("run", "serve", "transcript", "terminal"):
            if b.lang != "sh":
                bad.append(f"{b.where}: {b.mark.split(' ', 1)[0]!r} marks sh blocks only")
            elif b.mark.startswith("terminal") and not TERMINAL.fullmatch(b.mark):
                bad.append(f'{b.where}: write the mark as: terminal N of GROUP [until "TEXT"]')
        elif b.mark:
            bad.append(f'{b.where}: unknown mark {b.mark!r} (run / serve until "TEXT" / transcript / terminal N of GROUP / same as FILE / not run: REASON)')
        elif b.lang == "rust" and b.readme.resolve() not in doctest_pages():
            bad.append(f"{b.where}: a Rust block of a page core/src/lib.rs does not include as a doctest module (ReadmeDoctests): add the page there")
        elif b.lang not in RUNNERS:
            bad.append(f"{b.where}: a ```{b.lang} block that no test runs: mark it (see scripts/readme_blocks.py)")
    bad += broken_links()
    for name, g in groups().items():
        kinds = [h.kind for h in g.hidden]
        if not g.terminals:
            bad.append(f"{g.where}: group {name!r} has a {'/'.join(kinds)} but no terminal block")
        if kinds.count("setup") > 1 or kinds.count("check") > 1:
            bad.append(f"{g.where}: group {name!r} has more than one setup or check")
        numbers = [int(TERMINAL.fullmatch(b.mark).group(1)) for b in g.terminals]  # type: ignore[union-attr]
        if numbers != list(range(1, len(numbers) + 1)):
            bad.append(f"{g.where}: the terminals of group {name!r} are numbered {numbers}, not 1..{len(numbers)} in page order")
    return bad


# Pages other branches add (their links are checked once they exist): the walkthrough written with
# the relay's rooms.
PENDING: set[str] = set()

LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    return "".join(c for c in heading.strip().lower() if c.isalnum() or c in " -_").replace(" ", "-")


def broken_links() -> list[str]:
    """Relative links of the pages (README.md, docs/, face READMEs) to a file that does not exist,
    or to a heading the file does not have."""
    bad = []
    for page in readmes():
        text = page.read_text()
        fenced = False
        for n, line in enumerate(text.splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
            if fenced:
                continue
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):
                    continue
                file, _, anchor = target.partition("#")
                dest = (page.parent / file).resolve() if file else page
                rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
                if not dest.exists():
                    if rel not in PENDING:
                        bad.append(f"{page.relative_to(ROOT)}:{n}: a link to {target}, which does not exist")
                    continue
                if anchor and dest.suffix == ".md":
                    anchors = {slug(h.lstrip("#").replace("`", "")) for h in dest.read_text().splitlines() if re.match(r"#+ ", h)}
                    if anchor not in anchors:
                        bad.append(f"{page.relative_to(ROOT)}:{n}: a link to {target}: {rel} has no heading #{anchor}")
    return bad


def _companion(b: Block) -> Block | None:
    """The c block a ``run (app.c: the c block above|below)`` mark names, from the same README."""
    m = re.search(r"app\.c: the c block (above|below)", b.mark)
    if not m:
        return None
    cs = [c for c in blocks(b.readme) if c.lang == "c"]
    near = [c for c in cs if c.line < b.line] if m.group(1) == "above" else [c for c in cs if c.line > b.line]
    if not near:
        raise SystemExit(f"{b.where}: no c block {m.group(1)} it")
    return near[-1] if m.group(1) == "above" else near[0]


def _scratch(d: str, b: Block, env: dict[str, str]) -> dict[str, str]:
    """Make the scratch directory ``d`` what a reader's shell has: ``$HOME``, ``make`` acting on
    this clone (the READMEs run it "from a clone"), ``app.c`` when the mark names a c block, and
    ``npx libtunnel`` as after ``npm install /path/to/libtunnel/bindings/node``."""
    bin_dir = Path(d) / ".bin"
    bin_dir.mkdir()
    make = bin_dir / "make"
    make.write_text(f'#!/bin/sh\nexec {shutil.which("make")} --no-print-directory -C "{ROOT}" "$@"\n')
    make.chmod(0o755)
    c = _companion(b)
    if c:
        (Path(d) / "app.c").write_text(c.text)
    modules = Path(d) / "node_modules"
    (modules / ".bin").mkdir(parents=True)
    (modules / "libtunnel").symlink_to(ROOT / "bindings" / "node")
    (modules / ".bin" / "libtunnel").symlink_to(ROOT / "bindings" / "node" / "bin" / "libtunnel.js")
    # A fresh $HOME, but the Rust toolchain of the real one (rustup and cargo look there).
    home = env.get("HOME", str(Path.home()))
    tools = {"RUSTUP_HOME": env.get("RUSTUP_HOME", f"{home}/.rustup"), "CARGO_HOME": env.get("CARGO_HOME", f"{home}/.cargo")}
    return {**env, **tools, "HOME": d, "PATH": f"{bin_dir}:{env['PATH']}"}


def _secrets(text: str, env: dict[str, str], secret: str | None = None) -> str:
    """``text`` with real keys for the placeholders of the relay examples (``0mB1…=``, ``…``):
    ``secret``, or a fresh one."""
    secret = secret or base64.b64encode(os.urandom(32)).decode()
    for k, v in {"1:0mB1…=": f"1:{secret}", '"data":"0mB1…="': f'"data":"{secret}"', '"data":"…"': f'"data":"{secret}"'}.items():
        text = text.replace(k, v)
    if '"public_key":"…"' in text:  # a listener's key, as `keygen --listener` prints it
        with tempfile.TemporaryDirectory() as d:
            r = subprocess.run(["node", str(ROOT / "bindings/node/bin/libtunnel.js"), "keygen", "--listener", "--out", f"{d}/k.pem"], env=env, capture_output=True, text=True, timeout=60, check=True)
        public = re.search(r'"public_key":"([^"]+)"', r.stdout)
        assert public, f"keygen --listener printed: {r.stdout}"
        text = text.replace('"public_key":"…"', f'"public_key":"{public.group(1)}"')
    return text


def _serve(b: Block, text: str, cwd: str, env: dict[str, str], until: str) -> tuple[bool, str]:
    """Run a block that starts a server, in a network namespace of its own (so its
    ``0.0.0.0:7835`` is that namespace's loopback only); pass once ``until`` is printed."""
    script = "ip link set lo up\n" + text
    # As root, a network namespace; otherwise inside a user namespace of our own too.
    unshare = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--map-root-user", "--net"]
    p = subprocess.Popen([*unshare, "bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in p.stdout or []] + [lines.put("")], daemon=True).start()
    out: list[str] = []
    deadline = time.monotonic() + SERVE_LIMIT
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            if not line:
                break
            out.append(line)
            if until in line:
                return True, "".join(out)
        return False, "".join(out) + f"(exit {p.poll()}; never printed {until!r})\n"
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=30)


def _elided(shown: str) -> str:
    """A regex for one output line as a README shows it: ``…`` inside a key (``0mB1…=``) stands
    for any base64 text, a ``…`` on its own for any text."""
    out, last = [], 0
    for m in re.finditer(r"[A-Za-z0-9+/]*…[A-Za-z0-9+/=]*", shown):
        out.append(re.escape(shown[last : m.start()]))
        out.append(".*" if m.group() == "…" else "[A-Za-z0-9+/=]+")
        last = m.end()
    out.append(re.escape(shown[last:]))
    return "".join(out)


def _transcript(text: str, cwd: str, env: dict[str, str]) -> tuple[bool, str]:
    """``$ COMMAND`` lines and the output shown under each (``…`` stands for any text)."""
    steps: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line)
    for cmd, want in steps:
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        got = r.stdout.splitlines()
        pats = [re.compile(_elided(w) + r"\Z") for w in want]
        if r.returncode != 0 or r.stderr or len(got) != len(pats) or not all(p.match(g) for p, g in zip(pats, got)):
            return False, f"$ {cmd}\nexit {r.returncode}\n--- stdout:\n{r.stdout}--- stderr:\n{r.stderr}--- the README shows:\n" + "\n".join(want) + "\n"
    return True, ""


def _selected(page: Path, only: list[str]) -> bool:
    """Whether ``only`` (pages relative to the root, or directories ending in ``/``) names the page."""
    rel = page.relative_to(ROOT).as_posix()
    return not only or any(rel == o or (o.endswith("/") and rel.startswith(o)) for o in only)


def run_sh(env: dict[str, str], only: list[str], group: str | None = None) -> int:
    """Run the sh blocks marked ``run``, ``serve until "TEXT"`` or ``transcript``, each in a fresh
    scratch directory, then the groups of ``terminal`` blocks (:func:`run_group`), of the pages
    ``only`` names (all when empty); with ``group``, that group only. Prints each result; returns
    the number of failures."""
    failed = 0
    for b in code_blocks("sh"):
        if group or not _selected(b.readme, only):
            continue
        mode = b.mark.split(" ", 1)[0]
        if mode not in ("run", "serve", "transcript"):
            continue
        text = b.text if mode == "transcript" else _secrets(b.text, env)
        with tempfile.TemporaryDirectory(prefix="readme-sh-") as d:
            run_env = _scratch(d, b, env)
            if mode == "serve":
                until = re.fullmatch(r'serve until "(.*)"', b.mark)
                if not until:
                    raise SystemExit(f'{b.where}: write the mark as: serve until "TEXT THE SERVER PRINTS"')
                ok, log = _serve(b, text, d, run_env, until.group(1))
            elif mode == "transcript":
                ok, log = _transcript(text, d, run_env)
            else:
                r = subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=d, env=run_env, capture_output=True, text=True, timeout=900)
                ok, log = r.returncode == 0, f"exit {r.returncode}\n--- stdout:\n{r.stdout}--- stderr:\n{r.stderr}"
        if ok:
            print(f"ok: {b.where} runs as pasted ({mode})")
        else:
            failed += 1
            print(f"FAIL {b.where}:\n{b.text}{log}")
    for name, g in groups().items():
        if not _selected(g.readme, only) or (group and name != group):
            continue
        ok, log = run_group(name, g, env)
        if ok:
            print(f"ok: {g.where} group {name!r} runs as pasted ({len(g.terminals)} terminal(s))\n{log}", end="")
        else:
            failed += 1
            print(f"FAIL {g.where} group {name!r}:\n{log}")
    return failed


HOSTS = """127.0.0.1 localhost relay.example.com relay
127.0.0.2 db.internal internal-api.db.internal bastion.internal
::1 localhost ip6-localhost ip6-loopback
"""


def run_group(name: str, g: Group, env: dict[str, str]) -> tuple[bool, str]:
    """Run a group's blocks as a reader would in several terminals, each as pasted: in a network,
    mount and PID namespace of its own (loopback up; a private /etc/hosts puts ``relay.example.com``
    on 127.0.0.1 and ``db.internal`` and the other private hosts on 127.0.0.2), in one scratch
    directory that is every terminal's working directory and ``$HOME``. First the hidden setup
    (it sources scripts/readme_setup.sh: the relay, the databases, keys; exit 0), then the
    terminals in their order: ``until "TEXT"`` starts one that keeps running (a server, a forward)
    and waits, bounded, for TEXT on its output; without ``until`` a terminal must end by itself
    with exit 0 and nothing on stderr, as a user would see it. Then the hidden check (exit 0,
    nothing on stderr); every terminal still running must not have exited meanwhile nor printed a
    warning or an error, and each must exit 0 on Ctrl-C (SIGINT to its process group), again without one. The key
    placeholders are one secret for the whole group; ``fill OLD NEW`` in the setup replaces
    what a reader types in (a name, a key) in the terminals and the check."""
    secret = base64.b64encode(os.urandom(32)).decode()
    with tempfile.TemporaryDirectory(prefix=f"readme-{name}-") as d:
        run_env = _scratch(d, g.terminals[0], env)
        plan = Path(d) / ".readme-plan"
        steps = [("setup", "", f'source "{ROOT}/scripts/readme_setup.sh"\n' + _secrets(g.step("setup"), env, secret))]
        for b in g.terminals:
            m = TERMINAL.fullmatch(b.mark)
            assert m
            steps.append((f"terminal {m.group(1)} ({b.where})", m.group(3) or "", _secrets(b.text, env, secret)))
        steps.append(("check", "", f'source "{ROOT}/scripts/readme_setup.sh"\n' + _secrets(g.step("check"), env, secret)))
        plan.write_text(json.dumps(steps))
        (Path(d) / ".readme-hosts").write_text(HOSTS)
        unshare = ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child"]
        if os.geteuid() != 0:
            unshare.insert(1, "--map-root-user")
        run_env["README_SECRET"] = secret
        r = subprocess.run([*unshare, sys.executable, __file__, "_group", d], cwd=d, env=run_env, capture_output=True, text=True, timeout=SERVE_LIMIT * (len(steps) + 2))
        return r.returncode == 0, r.stdout + r.stderr


def _terminal_log(d: str, what: str) -> Path:
    """Where a long-running terminal's output goes (``.terminal-N.log``, which a check may read)."""
    return Path(d) / f".{what.split(' (')[0].replace(' ', '-')}.log"


def _group_inside(d: str) -> int:
    """The part of :func:`run_group` that runs inside the namespaces (PID 1 there: every process
    the group started dies when this returns)."""
    subprocess.run(["mount", "--bind", f"{d}/.readme-hosts", "/etc/hosts"], check=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    steps = json.loads(Path(d, ".readme-plan").read_text())
    fills: list[tuple[str, str]] = []
    running: list[tuple[str, subprocess.Popen[str]]] = []
    for what, until, text in steps:
        for old, new in fills:
            text = text.replace(old, new)
        if until:
            log = _terminal_log(d, what)
            out = open(log, "w")
            p = subprocess.Popen(["bash", "-euo", "pipefail", "-c", text], cwd=d, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            running.append((what, p))
            w = subprocess.run(["bash", "-c", f'source "{ROOT}/scripts/readme_setup.sh"; README_WAIT={SERVE_LIMIT:.0f} await_line "$1" "$2" "$3"', "-", str(log), until, str(p.pid)], capture_output=True, text=True)
            if w.returncode != 0 or p.poll() is not None:
                print(f"{what} never printed {until!r} (exit {p.poll()}); its output:\n{log.read_text()}")
                return 1
            print(f"  {what}: printed {until!r}")
        elif text.strip():
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=d, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=SERVE_LIMIT)
            # The setup's servers log to files; its own stderr is only a failure's message.
            if r.returncode != 0 or (r.stderr and what != "setup"):
                print(f"{what}: exit {r.returncode}\n--- script:\n{text}--- stdout:\n{r.stdout}--- stderr:\n{r.stderr}")
                for name in sorted(os.listdir(d)):
                    if name.endswith(".log"):
                        print(f"--- {name}:\n{Path(d, name).read_text()[-4000:]}")
                return 1
            print(f"  {what}: exit 0" + (", nothing on stderr" if what != "setup" else ""))
        fill = Path(d) / ".readme-fill"
        if fill.exists():
            fills = [tuple(line.split("\t", 1)) for line in fill.read_text().splitlines() if "\t" in line]  # type: ignore[misc]
    for what, p in running:
        if p.poll() is not None:
            print(f"{what} exited ({p.returncode}) before the group was done")
            return 1
    # What a reader sees in the terminals that kept running: no warning or error for what worked.
    noisy = _noisy_lines(d, running)
    if noisy:
        print("a terminal that kept running logged a warning or an error:\n" + "\n".join(noisy))
        return 1
    # Then Ctrl-C in each, last started first, as a reader ends them: each exits 0 on its own
    # (a drain with nothing open is immediate).
    for what, p in reversed(running):
        os.killpg(p.pid, signal.SIGINT)
        try:
            rc = p.wait(timeout=SERVE_LIMIT)
        except subprocess.TimeoutExpired:
            print(f"{what} did not exit within {SERVE_LIMIT:.0f} s of Ctrl-C")
            return 1
        if rc != 0:
            print(f"{what} exited {rc} after Ctrl-C; its output:\n{_terminal_log(d, what).read_text()}")
            return 1
    # Nor while shutting down: a reader's Ctrl-C is a success, not something to warn about.
    noisy = _noisy_lines(d, running)
    if noisy:
        print("a terminal logged a warning or an error when Ctrl-C stopped it:\n" + "\n".join(noisy))
        return 1
    print("  Ctrl-C in each terminal that kept running: exit 0, no warning")
    return 0


def _noisy_lines(d: str, running: list) -> list[str]:
    """The warning and error lines the running terminals of a group have logged so far."""
    noisy = []
    for what, _ in running:
        log = _terminal_log(d, what).read_text()
        noisy += [f"{what}: {line}" for line in log.splitlines() if re.search(r"\b(WARN|ERROR)\b|^error", line)]
    return noisy


def write_c(out: Path, *, relay: str, key: str, db: str) -> None:
    """Every c block not marked `not run`, placeholders filled, as OUT/<readme>-<line>.c; prints each path."""
    out.mkdir(parents=True, exist_ok=True)
    for b in code_blocks("c"):
        if b.mark.startswith("not run: "):
            continue
        name = b.readme.relative_to(ROOT).as_posix().replace("/", "-").removesuffix(".md")
        path = out / f"{name}-{b.line}.c"
        path.write_text(fill(b.text, relay=relay, key=key, db=db))
        print(path)


def main(argv: list[str]) -> int:
    cmd = argv[1] if len(argv) > 1 else "check"
    if cmd == "check":
        bad = problems()
        for p in bad:
            print(p)
        n = len(code_blocks())
        print(f"{n} code blocks in {len(readmes())} READMEs; {len(bad)} problem(s)")
        return 1 if bad else 0
    if cmd == "list":
        for b in code_blocks():
            how = b.mark or (f"run by the {b.lang} tests" if b.lang in RUNNERS else "UNMARKED")
            print(f"{b.where}\t{b.lang}\t{how}")
        return 0
    if cmd == "sh":
        return 1 if run_sh(dict(os.environ), argv[2:]) else 0
    if cmd == "_group" and len(argv) == 3:
        return _group_inside(argv[2])
    if cmd == "group" and len(argv) == 3:
        if argv[2] not in groups():
            print(f"no group {argv[2]!r}; the groups: {' '.join(groups())}", file=sys.stderr)
            return 2
        return 1 if run_sh(dict(os.environ), [], argv[2]) else 0
    if cmd == "c" and len(argv) == 6:
        write_c(Path(argv[2]), relay=argv[3], key=argv[4], db=argv[5])
        return 0
    print("usage: readme_blocks.py check | list | sh [PAGE|DIR/...] | group NAME | c OUT_DIR RELAY_URL KEY HOST:PORT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
