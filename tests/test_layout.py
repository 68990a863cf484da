"""The package graph points one way, down: target <- drafters <- data <- inference <- train (drafters imports no
other in-house package at all). Parsed from the source, so a late import inside a function counts too."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["target", "drafters", "data", "inference", "train"]


def in_house_imports(path: Path) -> set[str]:
    """Top-level in-house packages that the module at `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & set(LAYERS)
    return found


def upward_edges() -> list[str]:
    edges = []
    for level, package in enumerate(LAYERS):
        for path in sorted((ROOT / package).glob("*.py")):
            for imported in in_house_imports(path):
                upward = LAYERS.index(imported) > level
                if upward or (package == "drafters" and imported != "drafters"):
                    edges.append(f"{path.relative_to(ROOT)} imports {imported}")
    return edges


def test_imports_point_down():
    assert upward_edges() == []


def test_the_parser_sees_late_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from train.config import load_config\n    import inference.tree\n")
    assert in_house_imports(module) == {"train", "inference"}
