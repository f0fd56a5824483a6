"""The package's layers (edge_relay/__init__.py's docstring), enforced on the import graph.

Every module is parsed with ast (nothing is imported), so a module-level and
a function-level import count the same.
"""

import ast
import fnmatch
import pathlib
import re

import edge_relay

PKG = pathlib.Path(edge_relay.__file__).parent

SANS_IO = ("codec", "policy")
FORBIDDEN_STDLIB = {"selectors", "select", "ctypes", "time", "signal", "threading", "asyncio",
                    "subprocess"}
SOCKET_ALLOWED = {"AF_INET", "AF_INET6", "inet_pton", "inet_ntop"}


def layer_table():
    """{layer: [module name or glob]} from the package docstring."""
    doc = edge_relay.__doc__
    table = doc.split("Layers (", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    out = {}
    for line in table:
        layer, *names = line.split()
        out[layer] = names
    return out


def modules():
    """{dotted name relative to edge_relay: path}; a subpackage counts as its top name's layer."""
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        if parts:
            out[".".join(parts)] = path
    return out


def layer_of(name, table):
    top = name.split(".")[0]
    for layer, names in table.items():
        if any(fnmatch.fnmatchcase(top, pat) for pat in names):
            return layer
    return None


class Imports(ast.NodeVisitor):
    """What one module imports: edge_relay modules, stdlib top names, socket attributes."""

    def __init__(self, name, is_package):
        self.name = name
        self.package = name if is_package else name.rpartition(".")[0]
        self.internal = set()     # (module, lineno)
        self.stdlib = set()       # (top name, lineno)
        self.socket_names = set()  # (attribute, lineno)

    def _resolve(self, level, module):
        base = self.package.split(".") if self.package else []
        if level > 1:
            base = base[:len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def visit_Import(self, node):
        for a in node.names:
            if a.name == "edge_relay" or a.name.startswith("edge_relay."):
                self.internal.add((a.name[len("edge_relay."):], node.lineno))
            else:
                self.stdlib.add((a.name.split(".")[0], node.lineno))

    def visit_ImportFrom(self, node):
        if node.level == 0 and not (node.module or "").startswith("edge_relay"):
            top = node.module.split(".")[0]
            self.stdlib.add((top, node.lineno))
            if top == "socket":
                self.socket_names.update((a.name, node.lineno) for a in node.names)
            return
        if node.level == 0:
            target = node.module[len("edge_relay."):] if node.module != "edge_relay" else ""
        else:
            target = self._resolve(node.level, node.module)
        for a in node.names:
            full = f"{target}.{a.name}" if target else a.name
            # `from . import x` names a module x when x.py (or x/) exists.
            self.internal.add((full if _exists(full) else target, node.lineno))

    def visit_Attribute(self, node):
        if isinstance(node.value, ast.Name) and node.value.id == "socket":
            self.socket_names.add((node.attr, node.lineno))
        self.generic_visit(node)


def _exists(name):
    path = PKG.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def graph():
    out = {}
    for name, path in modules().items():
        v = Imports(name, path.name == "__init__.py")
        v.visit(ast.parse(path.read_text(), str(path)))
        v.internal = {(m, ln) for m, ln in v.internal if m and m != name}
        out[name] = v
    return out


def test_every_module_has_a_layer():
    table = layer_table()
    assert set(table) == {"codec", "policy", "io", "operator", "demo"}
    missing = sorted(n for n in modules() if layer_of(n, table) is None)
    assert not missing, f"add these modules to the layer table in edge_relay/__init__.py: {missing}"


def test_codec_and_policy_do_no_io_and_read_no_clock():
    table = layer_table()
    bad = []
    for name, v in graph().items():
        if layer_of(name, table) not in SANS_IO:
            continue
        for top, ln in v.stdlib:
            if top in FORBIDDEN_STDLIB:
                bad.append(f"{name}:{ln} imports {top}")
        for attr, ln in v.socket_names:
            if attr not in SOCKET_ALLOWED:
                bad.append(f"{name}:{ln} uses socket.{attr}")
        for mod, ln in v.internal:
            if layer_of(mod, table) not in SANS_IO:
                bad.append(f"{name}:{ln} imports {mod} ({layer_of(mod, table)} layer)")
    assert not bad, "\n".join(sorted(bad))


def test_nothing_but_cli_imports_the_demo():
    table = layer_table()
    bad = []
    for name, v in graph().items():
        if layer_of(name, table) == "demo":
            continue
        for mod, ln in v.internal:
            if layer_of(mod, table) == "demo" and name != "cli":
                bad.append(f"{name}:{ln} imports {mod}")
    assert not bad, "\n".join(sorted(bad))


def test_cli_imports_the_demo_only_inside_a_function():
    tree = ast.parse((PKG / "cli.py").read_text())
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [node.module or "" if isinstance(node, ast.ImportFrom) else ""]
            assert not any(re.match(r"(edge_relay\.)?demo", n) for n in names), ast.dump(node)


def test_imports_are_acyclic():
    g = {name: {m for m, _ in v.internal} for name, v in graph().items()}
    # A submodule import also runs its package's __init__.
    for name in list(g):
        if "." in name:
            g[name].add(name.rpartition(".")[0])
    done, stack, cycles = set(), [], []

    def visit(n):
        if n in stack:
            cycles.append(stack[stack.index(n):] + [n])
            return
        if n in done:
            return
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if m != n and not (n.startswith(m + ".")):
                visit(m)
        stack.pop()
        done.add(n)

    for n in sorted(g):
        visit(n)
    assert not cycles, cycles


def test_the_checker_sees_what_it_must():
    """The visitor catches each kind of import the rules are about (so the tests above can fail)."""
    v = Imports("router", False)
    v.visit(ast.parse("import time\nfrom socket import socket\nfrom . import worker\n"
                      "def f():\n    from .demo import run\n    socket.sendto\n"))
    assert ("time", 1) in v.stdlib
    assert ("socket", 2) in v.socket_names and ("sendto", 6) in v.socket_names
    assert ("worker", 3) in v.internal
    assert {m for m, _ in v.internal} >= {"worker", "demo.run"}
    table = layer_table()
    assert layer_of("worker", table) == "io" and layer_of("demo.run", table) == "demo"
    assert layer_of("adapter_ice", table) == "io"


README = PKG.parent / "README.md"


def readme_modules():
    """{module path as written: layer} from the README's "### Modules" table."""
    text = README.read_text()
    assert "\n### Modules\n" in text, "README.md has no '### Modules' section (the module table)"
    section = text.split("\n### Modules\n", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([^`]+)` \| ([a-z]*) \|", line)
        if m:
            assert m.group(1) not in rows, f"README.md module table: {m.group(1)} listed twice"
            rows[m.group(1)] = m.group(2)
    return rows


def module_files():
    """{README name: layer of it}: `x.py` for edge_relay/x.py, `pkg/` for a subpackage, `pkg/x.py` in it."""
    table = layer_table()
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.as_posix() == "__init__.py":
            out["__init__.py"] = ""
            continue
        parts = rel.with_suffix("").parts
        name = f"{rel.parent.as_posix()}/" if rel.name == "__init__.py" else rel.as_posix()
        dotted = ".".join(p for p in parts if p != "__init__")
        out[name] = layer_of(dotted, table) or "?"
    return out


def test_readme_module_table_names_every_module_with_its_layer():
    listed, present = readme_modules(), module_files()
    missing = sorted(set(present) - set(listed))
    assert not missing, ("README.md '### Modules' has no row for: " + ", ".join(missing)
                         + "; add `| `NAME` | LAYER | what it holds |` rows (LAYER from edge_relay/__init__.py): "
                         + "; ".join(f"{n} -> {present[n]}" for n in missing))
    gone = sorted(set(listed) - set(present))
    assert not gone, f"README.md '### Modules' lists modules that do not exist: {', '.join(gone)}"
    wrong = sorted(f"{n}: README says {listed[n] or '(none)'}, edge_relay/__init__.py says {present[n] or '(none)'}"
                   for n in present if listed[n] != present[n])
    assert not wrong, "README.md '### Modules' layer column: " + "; ".join(wrong)


def test_readme_module_check_sees_a_missing_row(monkeypatch, tmp_path):
    """The table test can fail: a README without one module's row is caught, named."""
    fake = tmp_path / "README.md"
    fake.write_text(README.read_text().replace("| `stun.py` |", "| `stun_gone.py` |"))
    monkeypatch.setitem(globals(), "README", fake)
    listed = readme_modules()
    assert "stun.py" not in listed and "stun_gone.py" in listed
    assert "stun.py" in set(module_files()) - set(listed)
