"""The code's shape: the line limit, and the README's promise of the algorithm's size."""
import ast
import glob
import os
import re

from conftest import ROOT

LIMIT = 100  # characters per line, every Python file of the repository


def python_files():
    return sorted(glob.glob(os.path.join(ROOT, "*.py"))
                  + glob.glob(os.path.join(ROOT, "tests", "*.py"))
                  + glob.glob(os.path.join(ROOT, "operations", "*.py")))


def test_lines_within_the_limit():
    long = [f"{os.path.relpath(p, ROOT)}:{n}: {len(line)} characters"
            for p in python_files() for n, line in enumerate(open(p).read().splitlines(), 1)
            if len(line) > LIMIT]
    assert not long, f"{len(long)} lines over {LIMIT} characters:\n" + "\n".join(long[:20])


def code_lines(path):
    """Lines that are neither blank, nor comments, nor docstrings."""
    src = open(path).read()
    doc = set()
    for node in ast.walk(ast.parse(src)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            doc.update(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(1 for n, line in enumerate(src.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and n not in doc)


def test_readme_states_the_algorithms_size():
    """'The algorithm is about N lines in four files (M of them code ...)': true within 10 %."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    m = re.search(
        r"algorithm is about ([\d,]+) lines in four files\*\* \(([\d,]+) of them code", readme
    )
    assert m, "the README's size promise is missing"
    files = [os.path.join(ROOT, f) for f in ("sde.py", "unet.py", "cascade.py", "tiler.py")]
    total = sum(len(open(f).read().splitlines()) for f in files)
    code = sum(code_lines(f) for f in files)
    said_total, said_code = (int(g.replace(",", "")) for g in m.groups())
    assert abs(total - said_total) <= 0.1 * said_total, (total, said_total)
    assert abs(code - said_code) <= 0.1 * said_code, (code, said_code)
