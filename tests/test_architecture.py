"""The package's shape: no import cycles, and one home for every exception class."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import asgi_resilience
from asgi_resilience import exceptions

PACKAGE = Path(asgi_resilience.__file__).parent


def module_names() -> list[str]:
    names = ["asgi_resilience"]
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="asgi_resilience."):
        names.append(info.name)
    return names


def _module_level_imports(name: str) -> set[str]:
    """The package modules ``name`` imports when it is imported (``TYPE_CHECKING`` blocks and
    imports inside functions left out: those run later, or never)."""
    module_file = importlib.util.find_spec(name).origin  # type: ignore[union-attr]
    assert module_file is not None
    is_package = module_file.endswith("__init__.py")
    tree = ast.parse(Path(module_file).read_text())
    known = set(module_names())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {module for module in found if module in known and module != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (module -> modules it imports), or ``None``."""
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> list[str] | None:
        if module in done:
            return None
        if module in visiting:
            return [*visiting[visiting.index(module) :], module]
        visiting.append(module)
        for imported in sorted(graph[module]):
            cycle = visit(imported)
            if cycle is not None:
                return cycle
        visiting.pop()
        done.add(module)
        return None

    for module in graph:
        cycle = visit(module)
        if cycle is not None:
            return cycle
    return None


def test_no_import_cycles_inside_the_package() -> None:
    graph = {name: _module_level_imports(name) for name in module_names()}
    assert "asgi_resilience.stack" in graph["asgi_resilience"]  # the walk sees imports
    assert "asgi_resilience.context" in graph["asgi_resilience.observe"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": set(), "a": {"a"}}) == ["a", "a"]


def test_every_exception_class_lives_in_exceptions_and_keeps_its_old_place() -> None:
    defined: dict[str, type[BaseException]] = {}
    places: dict[str, list[str]] = {}
    for name in module_names():
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__.startswith("asgi_resilience")
                and not attribute.startswith("_")
            ):
                defined[attribute] = value
                places.setdefault(attribute, []).append(name)
    drawn = {n for n in exceptions.__all__ if inspect.isclass(getattr(exceptions, n))}
    assert set(defined) == drawn  # nothing defined elsewhere, nothing listed that is not one
    for attribute, value in defined.items():
        assert value.__module__ == "asgi_resilience.exceptions", attribute
        assert attribute in exceptions.__all__ and getattr(exceptions, attribute) is value
        if attribute != "AppError" and not issubclass(value, exceptions.AppError):
            assert issubclass(value, exceptions.AsgiResilienceError), attribute
        assert attribute in (exceptions.__doc__ or ""), f"{attribute} not drawn in the tree"
    old_places = {
        "ConfigurationError": "asgi_resilience.config",
        "StartupError": "asgi_resilience.lifespan",
        "BackendError": "asgi_resilience.ratelimit.backends",
        "ReplyError": "asgi_resilience.ratelimit.pipe",
        "DatabaseUnavailable": "asgi_resilience.sqlalchemy",
        "UsageError": "asgi_resilience.cli",
    }
    for attribute, module_name in old_places.items():
        module = importlib.import_module(module_name)
        assert getattr(module, attribute) is getattr(exceptions, attribute)


def test_each_feature_declares_its_own_collectors() -> None:
    from asgi_resilience.metrics import DECLARED, Metrics

    assert {cls.__module__ for cls in DECLARED} == {
        "asgi_resilience.circuit_breaker",
        "asgi_resilience.health",
        "asgi_resilience.lifespan._core",
        "asgi_resilience.overload",
        "asgi_resilience.ratelimit._collectors",
        "asgi_resilience.websockets",
    }
    # metrics.py itself holds only the HTTP request collectors.
    source = Path(PACKAGE / "metrics.py").read_text()
    assert "asgi_resilience_" not in source
    # A feature's collectors are made once per registry, on first use.
    from prometheus_client import CollectorRegistry

    metrics = Metrics(CollectorRegistry())
    assert metrics.feature(DECLARED[0]) is metrics.feature(DECLARED[0])
