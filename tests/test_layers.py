"""The package's imports run one way: no cycle, the data layer never reaches the model, the loop never a CLI, and a
stage never reaches the trainer or the model builder (it sees the run through ``igpt.stages.context.RunContext``).

The test reads the source (``ast``) rather than importing it, so it sees imports inside functions too: an import
deferred into a function still couples the two modules, it only hides the cycle from the interpreter.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "igpt"

# The command-line front ends: each parses argv and calls into the library; nothing in the library calls back.
CLI = {"igpt.generate", "igpt.chat", "igpt.export", "igpt.eval.__main__", "igpt.lm_eval", "igpt.plan",
       "igpt.report", "igpt.train"}
# The model layer, which the data layer must never reach.
MODEL = ("igpt.model", "igpt.kernels")
# The layers, bottom (0) to top; a module may import its own layer and those below (docs/internals.md draws them).
# A name stands for the module and everything under it; the longest match wins.
LAYERS = {
    0: ("igpt", "igpt.config", "igpt.registry", "igpt.errors", "igpt.cli", "igpt.precision", "igpt.devices",
        "igpt.shards", "igpt.checksum", "igpt.safe_load", "igpt.runlock", "igpt.runlog", "igpt.schedule", "igpt.stages",
        "igpt.data.kinds", "igpt.data.jsonfile"),  # the stage table and the data-kind table are leaf tables
    1: ("igpt.data",),
    2: ("igpt.model", "igpt.kernels"),
    3: ("igpt.hub", "igpt.checkpoint", "igpt.parallel", "igpt.sampling", "igpt.metrics"),
    4: ("igpt.stages.base", "igpt.stages.context", "igpt.stages.pretrain", "igpt.stages.sft", "igpt.stages.rm",
        "igpt.stages.dpo", "igpt.stages.ppo", "igpt.stages.ppo_math", "igpt.stages.pref", "igpt.eval"),
    5: ("igpt.trainer", "igpt.build"),
    6: tuple(sorted(CLI)),
}


def _module_name(path):
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules():
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(name, modules):
    """The igpt module an import of ``name`` loads (its longest prefix that is a module), or None if not igpt."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(mod, path, modules):
    """Every igpt module ``mod`` imports, at module level or inside a function (``TYPE_CHECKING`` blocks skipped)."""
    tree = ast.parse(path.read_text(), str(path))
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import sub`` imports the submodule (and pkg's __init__, added below); ``from mod import x``
            # imports mod
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name, modules)
            if target and target != mod:
                found.add(target)
    # a submodule's import also runs its packages' __init__ files
    for target in list(found):
        parts = target.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent in modules and parent != mod and not mod.startswith(parent + "."):
                found.add(parent)
    return found


def _graph():
    modules = _modules()
    return {mod: _imports(mod, path, modules) for mod, path in modules.items()}


def _reach(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _path(graph, start, goal):
    prev, todo = {start: None}, [start]
    while todo:
        cur = todo.pop(0)
        for nxt in sorted(graph[cur]):
            if nxt not in prev:
                prev[nxt] = cur
                todo.append(nxt)
    if goal not in prev:
        return []
    out = [goal]
    while prev[out[-1]] is not None:
        out.append(prev[out[-1]])
    return out[::-1]


def test_no_import_cycle():
    graph = _graph()
    cycles = [" -> ".join(_path(graph, nxt, mod) + [nxt])
              for mod in sorted(graph) for nxt in sorted(graph[mod]) if mod in _reach(graph, nxt)]
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(c for c in cycles)))


def test_data_layer_never_imports_the_model():
    graph = _graph()
    bad = [" -> ".join(_path(graph, mod, hit))
           for mod in sorted(graph) if mod.startswith("igpt.data")
           for hit in sorted(_reach(graph, mod)) if hit.startswith(MODEL)]
    assert not bad, "the data layer reaches the model:\n" + "\n".join(bad)


def test_loop_never_imports_a_cli_module():
    graph = _graph()
    bad = [" -> ".join(_path(graph, "igpt.trainer", hit)) for hit in sorted(_reach(graph, "igpt.trainer") & CLI)]
    assert not bad, "the training loop reaches a command-line module:\n" + "\n".join(bad)


def _layer(mod):
    # the package root stands for itself only, so a new module under it must be placed explicitly
    best = max((name for names in LAYERS.values() for name in names
                if mod == name or (name != "igpt" and mod.startswith(name + "."))), key=len, default=None)
    return next(level for level, names in LAYERS.items() if best in names) if best else None


def test_every_import_points_down_the_layers():
    graph, modules = _graph(), _modules()
    # a package whose __init__ imports nothing (igpt.data) costs nothing to pass through: it has no layer
    empty = {mod for mod, path in modules.items() if path.name == "__init__.py" and not graph[mod]}
    unplaced = sorted(mod for mod in graph if _layer(mod) is None)
    up = [f"{mod} (layer {_layer(mod)}) -> {dep} (layer {_layer(dep)})" for mod in sorted(graph)
          for dep in sorted(graph[mod] - empty) if _layer(dep) is not None and _layer(mod) is not None
          and _layer(dep) > _layer(mod)]
    assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"
    assert not up, "imports pointing up the layers:\n" + "\n".join(up)


def test_stages_never_reach_the_trainer():
    """Stages receive a run context; the trainer and the builder call into them, never the other way (not even for
    type hints: a ``TYPE_CHECKING`` import of the trainer would be the old two-way contract in disguise)."""
    graph = _graph()
    loop = ("igpt.trainer", "igpt.build", "igpt.train")
    bad = [" -> ".join(_path(graph, mod, hit)) for mod in sorted(graph) if mod.startswith("igpt.stages")
           for hit in sorted(_reach(graph, mod)) if hit in loop]
    hints = [str(p) for p in (ROOT / "stages").glob("*.py") if "igpt.trainer" in p.read_text()]
    assert not bad and not hints, "a stage reaches the loop:\n" + "\n".join(bad + hints)


def test_the_walk_sees_function_level_imports(tmp_path):
    """The walker must not miss a deferred import, the usual way a cycle hides."""
    graph = _graph()
    assert graph and all(mod.startswith("igpt") for mod in graph)
    src = "def f():\n    from igpt import trainer\n"
    tree_mods = {"igpt.x": tmp_path / "x.py", "igpt.trainer": tmp_path / "trainer.py"}
    (tmp_path / "x.py").write_text(src)
    assert _imports("igpt.x", tmp_path / "x.py", tree_mods) == {"igpt.trainer"}
