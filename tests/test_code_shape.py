"""The engine's code stays in small functions: none over 60 lines, and the public entry point,
``ParaThinkerEngine.generate``, a short read (encode, plan, schedule, assemble) of at most 40
lines without its docstring. Read from the source with ``ast``: nothing is imported."""

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "lm_eval_parathinker" / "engine"
MAX_FUNCTION_LINES = 60
MAX_GENERATE_LINES = 40


def _functions(tree: ast.Module):
    """(qualified name, node) of every function and method, nested ones included."""

    def walk(node: ast.AST, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    yield name, child
                yield from walk(child, f"{name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def _lines(node: ast.FunctionDef, docstring: bool = True) -> int:
    """Lines from the ``def`` to the end of the body; without ``docstring``, less the docstring's."""
    n = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if not docstring and isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
            and isinstance(first.value.value, str):
        n -= first.end_lineno - first.lineno + 1
    return n


def test_no_engine_function_is_over_60_lines():
    modules = sorted(ENGINE.glob("*.py"))
    assert len(modules) > 5, f"no engine modules found under {ENGINE}"
    long = [f"{path.name}: {name} has {_lines(node)} lines" for path in modules
            for name, node in _functions(ast.parse(path.read_text(), str(path))) if _lines(node) > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: " + "; ".join(long)


def test_generate_is_at_most_40_lines_without_its_docstring():
    path = ENGINE / "generate.py"
    found = dict(_functions(ast.parse(path.read_text(), str(path))))
    generate = found["ParaThinkerEngine.generate"]
    assert _lines(generate) > _lines(generate, docstring=False)  # it has a docstring, and it is left out
    assert _lines(generate, docstring=False) <= MAX_GENERATE_LINES, \
        f"ParaThinkerEngine.generate has {_lines(generate, docstring=False)} lines without its docstring"


def test_the_line_count_reads_what_it_should():
    """The counter itself, on a known source: a nested function, a method, a docstring."""
    source = 'class A:\n    def f(self):\n        """Doc\n        string."""\n        return 1\n\n' \
             'def g():\n    def h():\n        pass\n    return h\n'
    found = dict(_functions(ast.parse(source)))
    assert sorted(found) == ["A.f", "g", "g.h"]
    assert (_lines(found["A.f"]), _lines(found["A.f"], docstring=False)) == (4, 2)
    assert (_lines(found["g"]), _lines(found["g.h"])) == (4, 2)
