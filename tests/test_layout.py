"""The architecture holds: command modules over role sub-packages, imports one way, no circles, small modules, one
registry of methods that everything reads, and metric names that are the same strings everywhere."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STAGES = REPO / "stages"
COMMANDS = {"data", "rollout", "verify", "score", "update", "loop", "eval", "analyze", "plot", "report", "merge",
            "inspect"}
LEAVES = {  # these import nothing of stages/ outside the listed modules
    "stages.method": "stages.method.",
    "stages.common": "stages.common.",
    "stages.verifier.answers": ("stages.verifier.answers", "stages.verifier.sandbox", "stages.verifier.reward"),
    "stages.verifier.sandbox": ("stages.verifier.answers", "stages.verifier.sandbox"),
    "stages.verifier.reward": ("stages.verifier.reward",),
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in STAGES.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The stages modules `path` imports anywhere (module level or inside functions); packages themselves excluded."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages"):
            deps.add(node.module)
            deps.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            deps.update(alias.name for alias in node.names)
    return {d for d in deps if d in modules and modules[d].name != "__init__.py"}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items() if path.name != "__init__.py"}


def test_the_top_level_holds_the_commands_only():
    modules = {p.stem for p in STAGES.glob("*.py")} - {"__init__"}
    assert modules == COMMANDS
    packages = {p.name for p in STAGES.iterdir() if (p / "__init__.py").exists()}
    assert packages == {"method", "lm", "verifier", "training", "runs", "common"}


def test_no_import_circles(graph):
    state: dict[str, int] = {}  # 1 = on the path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " → ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_sub_packages_never_import_a_command(graph):
    commands = {f"stages.{name}" for name in COMMANDS}
    offenders = {m: graph[m] & commands for m in graph if m.count(".") >= 2 and graph[m] & commands}
    assert not offenders


def test_the_formulas_the_verifier_and_common_io_import_nothing_else(graph):
    for module, deps in graph.items():
        for leaf, allowed in LEAVES.items():
            if module == leaf or module.startswith(leaf + "."):
                outside = {d for d in deps if not d.startswith(allowed)} if isinstance(allowed, str) \
                    else deps - set(allowed)
                assert not outside, f"{module} imports {outside}"


def test_no_module_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in STAGES.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long


def _mapped_modules() -> set[str]:
    """`stages.X` / `stages.pkg.X` for each module line of the map in stages/__init__.py's docstring."""
    mapped, package = set(), None
    for line in (STAGES / "__init__.py").read_text().splitlines():
        header = re.match(r"^(\w+)/ — ", line)
        if header:
            package = header.group(1)
        elif line.startswith("Commands"):
            package = ""
        elif re.match(r"^    \w+\s", line) and package is not None:
            name = line.split()[0]
            mapped.add(f"stages.{package}.{name}" if package else f"stages.{name}")
    return mapped


def test_every_module_is_named_in_the_map_of_stages_init():
    modules = {name for name, path in _modules().items() if path.name != "__init__.py"}
    assert modules == _mapped_modules()
    readme = (REPO / "README.md").read_text()
    assert all(f"`{package}/`" in readme for package in ("method", "lm", "verifier", "training", "runs", "common"))


# --- one registry of methods ---------------------------------------------------------------------------------------

TOY_METHOD = textwrap.dedent(
    """
    import json, sys
    from stages.method.terms import register_term

    @register_term("toy", gated_by_default=False, formula="A_seq_i + λ·2u")
    def toy(u):
        return 2 * u

    from antisd_cli.main import cli
    from stages.runs import config as run_config

    if sys.argv[1] == "config":
        print(json.dumps(run_config.resolve({}, ["update.method=toy"]).stages["update"]))
    else:
        cli.main(args=sys.argv[2:], prog_name="antisd", standalone_mode=True)
    """
)


def _with_toy(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """A process that registers a method through the registry alone, then runs `antisd ARGS`."""
    return subprocess.run([sys.executable, "-c", TOY_METHOD, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_a_method_added_through_the_registry_alone_reaches_help_config_and_update(tmp_path, tiny_model_dir):
    from test_update import make_scored

    shown = _with_toy("cli", "update", "--help", cwd=REPO)
    assert shown.returncode == 0, shown.stderr
    assert "grpo|sd|antisd|rkl-ascent|toy" in shown.stdout.replace("\n", "").replace(" ", "")
    resolved = _with_toy("config", cwd=REPO)
    assert resolved.returncode == 0, resolved.stderr
    assert json.loads(resolved.stdout.strip().splitlines()[-1]) == {"method": "toy"}
    scored = make_scored(tmp_path / "scored.parquet", tiny_model_dir, rewards=[1.0] * 8, pmi=1.0)
    trained = _with_toy("cli", "-q", "update", "--scored", str(scored), "--model", str(tiny_model_dir), "--out",
                        str(tmp_path / "toy"), "--method", "toy", "--lr", "1e-3", "--threads", "1",
                        "--variant", "paper", cwd=REPO)  # the paper's ungated λ acts from step 1 (§9 warms up first)
    assert trained.returncode == 0, trained.stderr[-2000:]
    metrics = json.loads((tmp_path / "toy" / "metrics.json").read_text())
    state = json.loads((tmp_path / "toy" / "antisd_state.json").read_text())
    assert state["method"] == "toy" and metrics["gate/lambda"] == 0.5  # ungated by its registered default
    assert metrics["actor/pg_loss"] < 0  # zero-variance rewards: only λ·2u = +1 per token acts


def test_the_readme_method_table_is_the_registry():
    from stages.method.terms import get_term, method_names

    readme = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| `([a-z][a-z-]*)` \| (.+?) \| (.+?) \|$", readme, flags=re.M)
    assert [name for name, _, _ in rows] == list(method_names())
    for name, formula, gate in rows:
        term = get_term(name)
        assert formula == term.formula, name
        assert gate.startswith("on" if term.gated_by_default else ("–" if not term.uses_teacher else "off")), name


# --- metric names: one definition ------------------------------------------------------------------------------------

def _defined_metric_names() -> set[str]:
    from stages.common import metrics

    names = {v for v in vars(metrics).values() if isinstance(v, str) and "/" in v}
    names |= set(metrics.PRIVILEGED.values())
    names |= {metrics.timing(stage) for stage in ("rollout", "verify", "score", "update", "eval", "weight_sync",
                                                  "model_load", "step")}
    return names


def test_metric_names_in_the_docs_are_the_logged_ones():
    from stages.common import metrics

    defined = _defined_metric_names()
    pattern = re.compile(r"`((?:%s)/[a-z_@0-9]+)`" % "|".join(metrics.NAMESPACES))
    found = set()
    for doc in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        found |= set(pattern.findall(doc.read_text()))
    undefined = {name for name in found if name not in defined and not name.startswith(metrics.EVAL_PREFIX)}
    assert found and not undefined, undefined


def test_an_update_logs_exactly_the_defined_names(tmp_path, tiny_model_dir):
    from test_update import make_scored

    from stages.training.config import UpdateConfig
    from stages.update import run

    scored = make_scored(tmp_path / "scored.parquet", tiny_model_dir)
    out = run(UpdateConfig(scored=str(scored), model=str(tiny_model_dir), out=str(tmp_path / "c"), threads=1))
    logged = set(json.loads((out / "metrics.json").read_text())) - {"step"}
    assert logged <= _defined_metric_names(), logged - _defined_metric_names()
