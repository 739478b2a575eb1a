"""The code's shape: line limit, line budgets, the import rule and its two layers, no cycle.

    python tests/test_style.py      # prints the budgets, the layers, the algorithm's size and
                                    # the first reading's (the README's figures come from here)

The components (the design card's files) hold the algorithm; operations/ holds what only serves
running it.
"""
import ast
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ROOT  # noqa: E402

LIMIT = 100  # characters per line, every Python file of the repository
# Whole lines a file may have: short enough to read in a sitting.
BUDGETS = {"sample.py": 350, "train.py": 440, "data.py": 400, "cascade.py": 520,
           "tiler.py": 330, "unet.py": 620, "metrics.py": 700, "sde.py": 540}
SUPPORT_BUDGET = 400  # each module of operations/
CORE = ("sde.py", "unet.py", "cascade.py", "tiler.py")  # import nothing from operations/
# The algorithm: the models and the sampler (CORE), training's data and loop, and sample_slide.
# The commands' flags (parse_args), entry points (main) and operations are not.
ALGORITHM = CORE + ("data.py", "train.py", "sample.py")
COMMAND = ("parse_args", "main", "in_memory", "make_slide", "train_models", "train_one",
           "index_lists", "distill_rounds")
# The first reading, in call order: a slide sampled, then a model trained.
FIRST_READING = [
    ("sample.py", "sample_slide"), ("tiler.py", "generate_stage"), ("tiler.py", "plan"),
    ("tiler.py", "batch_inputs"), ("tiler.py", "run_batch"), ("cascade.py", "CDM.sample"),
    ("cascade.py", "CDM.sample_level"),
    ("cascade.py", "level_inputs"), ("cascade.py", "augment"), ("cascade.py", "denoiser"),
    ("sde.py", "sample"), ("sde.py", "ancestral_step"), ("unet.py", "UNet.forward"),
    ("data.py", "StageLevelDataset.__getitem__"), ("data.py", "StageLevelDataset.example"),
    ("train.py", "Trainer.losses"), ("sde.py", "loss_fn"), ("train.py", "Trainer.train"),
]


def path(name):
    return os.path.join(ROOT, name)


def python_files():
    return sorted(glob.glob(path("*.py")) + glob.glob(path("tests/*.py"))
                  + glob.glob(path("operations/*.py")))


def support_modules():
    return sorted(glob.glob(path("operations/*.py")))


def n_lines(p):
    return len(open(p).read().splitlines())


def docstring_lines(tree):
    doc = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            doc.update(range(body[0].lineno, body[0].end_lineno + 1))
    return doc


def code_lines(p, spans=None):
    """Lines that are neither blank, nor comments, nor docstrings (within spans, if given)."""
    src = open(p).read()
    doc = docstring_lines(ast.parse(src))
    inside = (lambda n: True) if spans is None else (lambda n: any(a <= n <= b for a, b in spans))
    return sum(1 for n, line in enumerate(src.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and n not in doc
               and inside(n))


def definitions(p):
    """{qualified name: (first line, last line)} of the functions and classes in a file."""
    out = {}

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                name = prefix + child.name
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                out[name] = (first, child.end_lineno)
                walk(child, name + ".")
    walk(ast.parse(open(p).read()), "")
    return out


def algorithm_size():
    """(whole lines, code lines) of ALGORITHM without its COMMAND functions."""
    total = code = 0
    for f in ALGORITHM:
        n = n_lines(path(f))
        spans = [(a, b) for name, (a, b) in definitions(path(f)).items() if name in COMMAND]
        keep = [(1, n)] if not spans else complement(spans, n)
        total += sum(b - a + 1 for a, b in keep)
        code += code_lines(path(f), keep)
    return total, code


def complement(spans, n):
    out, at = [], 1
    for a, b in sorted(spans):
        if a > at:
            out.append((at, a - 1))
        at = max(at, b + 1)
    return out + ([(at, n)] if at <= n else [])


def reading_size():
    """(whole lines, code lines) of FIRST_READING."""
    total = code = 0
    for f, name in FIRST_READING:
        a, b = definitions(path(f))[name]
        total += b - a + 1
        code += code_lines(path(f), [(a, b)])
    return total, code


def called(f, name):
    """The algorithm's functions and methods (file, qualified name) that `name` in file f calls:
    `g(...)` of its own module, `module.g(...)` of an algorithm file, `self.g(...)` of its class,
    `Class(...)` as Class.__init__; decorators and nested functions count with their body."""
    defs, (a, b) = definitions(path(f)), definitions(path(f))[name]
    node = next(n for n in ast.walk(ast.parse(open(path(f)).read()))
                if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.lineno <= a + 3
                and n.end_lineno == b)
    cls, out = name.rsplit(".", 1)[0] if "." in name else None, set()
    modules = {m[:-3] for m in ALGORITHM}
    for call in (c for c in ast.walk(node) if isinstance(c, ast.Call)):
        fn = call.func
        if isinstance(fn, ast.Name) and fn.id in defs:
            out.add((f, fn.id if fn.id in defs and "." not in fn.id else fn.id))
        elif isinstance(fn, ast.Name) and fn.id + ".__init__" in defs:
            out.add((f, fn.id + ".__init__"))
        elif isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name):
            owner = fn.value.id
            if owner in modules:
                other = definitions(path(owner + ".py"))
                q = fn.attr if fn.attr in other else fn.attr + ".__init__"
                if q in other:
                    out.add((owner + ".py", q))
            elif owner == "self" and cls and f"{cls}.{fn.attr}" in defs:
                out.add((f, f"{cls}.{fn.attr}"))
    return out


def reading_with_callees(spine):
    """(whole lines, code lines, functions) of `spine` and every algorithm function it calls,
    transitively: what a reader of the first reading ends up reading."""
    seen, todo = set(), list(spine)
    while todo:
        item = todo.pop()
        if item not in seen:
            seen.add(item)
            todo += sorted(called(*item) - seen)
    total = code = 0
    for f, name in seen:
        a, b = definitions(path(f))[name]
        total += b - a + 1
        code += code_lines(path(f), [(a, b)])
    return total, code, len(seen)


def operations_imports(p):
    """The modules of operations/ a file imports."""
    out = []
    for node in ast.walk(ast.parse(open(p).read())):
        if isinstance(node, ast.ImportFrom) and node.module \
                and node.module.split(".")[0] == "operations":
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "operations"]
    return out


def first_sentence(p):
    doc = ast.get_docstring(ast.parse(open(p).read())) or ""
    return doc.split("\n\n")[0].strip()


# ---------------------------------------------------------------------- tests

def test_lines_within_the_limit():
    long = [f"{os.path.relpath(p, ROOT)}:{n}: {len(line)} characters"
            for p in python_files() for n, line in enumerate(open(p).read().splitlines(), 1)
            if len(line) > LIMIT]
    assert not long, f"{len(long)} lines over {LIMIT} characters:\n" + "\n".join(long[:20])


def test_files_within_their_budgets():
    over = [f"{f}: {n_lines(path(f))} lines > {b}" for f, b in BUDGETS.items()
            if n_lines(path(f)) > b]
    over += [f"{os.path.relpath(p, ROOT)}: {n_lines(p)} lines > {SUPPORT_BUDGET}"
             for p in support_modules() if n_lines(p) > SUPPORT_BUDGET]
    assert not over, "\n".join(over)


def test_core_files_import_nothing_from_operations():
    bad = {f: operations_imports(path(f)) for f in CORE if operations_imports(path(f))}
    assert not bad, bad


def test_only_the_design_cards_modules_at_the_top():
    top = sorted(os.path.basename(p) for p in glob.glob(path("*.py")))
    assert top == sorted(BUDGETS), top
    packages = sorted(d for d in os.listdir(ROOT) if os.path.isfile(path(f"{d}/__init__.py")))
    assert packages == ["operations"], packages


def project_imports(p):
    """The project's modules a file imports anywhere in it: top-level names ('cascade') and
    operations' modules ('operations.files')."""
    top = {os.path.basename(q)[:-3] for q in glob.glob(path("*.py"))}
    ops = {os.path.basename(q)[:-3] for q in support_modules()} - {"__init__"}
    out = set()
    for node in ast.walk(ast.parse(open(p).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + ([f"operations.{a.name}" for a in node.names]
                                     if node.module == "operations" else [])
        else:
            continue
        for n in names:
            head, _, rest = n.partition(".")
            if head in top:
                out.add(head)
            elif head == "operations" and rest.split(".")[0] in ops:
                out.add("operations." + rest.split(".")[0])
    return out


def module_path(m):
    return path(m.replace(".", "/") + ".py")


def test_operations_has_two_layers_one_way():
    """operations/__init__.py lists every module in one layer; LOWER imports no top-level module
    and nothing of UPPER; data.py imports only LOWER (EDM: utilities know nothing of the model)."""
    sys.path.insert(0, ROOT)
    import operations
    mods = {os.path.basename(q)[:-3] for q in support_modules()} - {"__init__"}
    lower, upper = set(operations.LOWER), set(operations.UPPER)
    assert lower | upper == mods and not lower & upper, (mods - lower - upper, lower & upper)
    allowed = {"operations." + m for m in lower}
    bad = {m: sorted(project_imports(module_path("operations." + m)) - allowed) for m in lower}
    bad["data"] = sorted(d for d in project_imports(path("data.py"))
                         if d.startswith("operations.") and d not in allowed)
    assert not any(bad.values()), {k: v for k, v in bad.items() if v}


def test_no_import_cycle():
    """The project's modules (top level and operations/) import one another without a cycle."""
    nodes = {os.path.basename(q)[:-3] for q in glob.glob(path("*.py"))}
    nodes |= {"operations." + os.path.basename(q)[:-3] for q in support_modules()} - {
        "operations.__init__"}
    graph = {m: project_imports(module_path(m)) & nodes for m in nodes}
    state, cycle = {}, []

    def visit(m, trail):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycle.append(trail + [m, d])
            elif d not in state:
                visit(d, trail + [m])
        state[m] = "done"
    for m in sorted(nodes):
        if m not in state:
            visit(m, [])
    assert not cycle, " -> ".join(cycle[0])


if __name__ == "__main__":
    print(f"{'file':<28}{'lines':>7}{'budget':>8}")
    for f, b in BUDGETS.items():
        print(f"{f:<28}{n_lines(path(f)):>7}{b:>8}{'  OVER' if n_lines(path(f)) > b else ''}")
    for p in support_modules():
        n = n_lines(p)
        print(f"{os.path.relpath(p, ROOT):<28}{n:>7}{SUPPORT_BUDGET:>8}"
              f"{'  OVER' if n > SUPPORT_BUDGET else ''}")
    for f in CORE:
        print(f"{f} imports from operations/: {operations_imports(path(f)) or 'nothing'}")
    ops = sum(n_lines(p) for p in support_modules())
    total, code = algorithm_size()
    print(f"the algorithm ({', '.join(ALGORITHM)}; without {', '.join(COMMAND)}): "
          f"{total} lines, {code} code")
    print(f"operations/: {ops} lines, {sum(code_lines(p) for p in support_modules())} code")
    total, code = reading_size()
    print(f"first reading: {total} lines, {code} code")
    slide, training = FIRST_READING[:13], FIRST_READING[13:]
    for label, spine in (("a slide", slide), ("a training step", training)):
        total, code, n = reading_with_callees([(f, q) for f, q in spine])
        print(f"  {label}: {len(spine)} functions of the spine and what they call in the "
              f"algorithm's files: {n} functions, {total} lines, {code} code")
    for f, name in FIRST_READING:
        a, b = definitions(path(f))[name]
        print(f"  {f}:{a} {name} ({b - a + 1} lines)")
