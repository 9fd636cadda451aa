"""The docs' examples are tested, so a page fails here when the code moves under it.

* docs/spec.md: every ```toml block is a complete spec that `toymesa.spec.parse` accepts,
  or, after ``<!-- fails: MESSAGE -->``, one it refuses with that message; README.md's
  complete specs (a ``[[hypotheses]]`` table alone is one) parse too.
* docs/worlds.md: every name it cites as ``module.name`` exists; each ``<!-- patch: NAME -->``
  diff applies to a copy of the code, and its ``<!-- check: NAME -->`` script passes there.
"""

import importlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import pytest

from toymesa import config, evaluate, presets, safety, spec, spec_fields
from toymesa.tasks import rules, world

vocab = importlib.import_module("toymesa.tasks.vocab")  # `toymesa.tasks.vocab` is also the function's name

ROOT = Path(__file__).resolve().parent.parent
SPEC_MD = (ROOT / "docs" / "spec.md").read_text()
WORLDS_MD = (ROOT / "docs" / "worlds.md").read_text()
BLOCK = re.compile(r"(?:<!-- (\w+)(?:: ([^\n]*?))? -->\n)?```(\w+)\n(.*?)```", re.S)


def blocks(text: str, lang: str) -> list[tuple[str, str, str]]:
    """(marker, argument, body) of every ```lang block; marker and argument from an HTML comment on the line above ("" without one)."""
    return [(mark, arg, body) for mark, arg, kind, body in BLOCK.findall(text) if kind == lang]


SPEC_BLOCKS = blocks(SPEC_MD, "toml")


def test_spec_page_has_its_examples():
    assert len(SPEC_BLOCKS) >= 10
    assert sum(mark == "fails" for mark, _, _ in SPEC_BLOCKS) >= 4
    assert any(set(tomllib.loads(body)) >= {"name", "seeds", "base", "grid", "random", "run", "hypotheses"} for _, _, body in SPEC_BLOCKS)


@pytest.mark.parametrize(("mark", "arg", "body"), SPEC_BLOCKS, ids=[f"block{i}" for i in range(len(SPEC_BLOCKS))])
def test_spec_page_toml_blocks(mark, arg, body):
    raw = tomllib.loads(body)
    if mark == "fails":
        with pytest.raises(spec.SpecError) as excinfo:
            spec.parse(raw, source="spec.toml", text=body)
        message = str(excinfo.value)
        assert "\n" not in message
        assert arg in message, (arg, message)
        assert message.startswith("spec.toml: " + arg.removeprefix("spec.toml: ").split(":")[0]), message
    else:
        assert not mark, f"unknown marker {mark!r}"
        assert spec.parse(raw, source="spec.toml", text=body).cells()


def test_spec_page_dotted_and_table_forms_are_one_spec():
    (dotted, table) = [spec.parse(tomllib.loads(body)) for _, _, body in SPEC_BLOCKS if "steps = 200" in body]
    assert dotted.digest == table.digest and dotted.cells() == table.cells()


def test_spec_page_counts():
    """The counts and lengths the page states for its examples."""
    full, *_ = (spec.parse(tomllib.loads(b)) for _, _, b in SPEC_BLOCKS if b.startswith('name = "lr_and_rules"'))
    assert len(full.cells()) == 8 and len(spec.groups(full.cells())) == 2 and full.seeds == (0, 1, 2, 3)
    assert full.cells()[0].config.model == config.ModelConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64)
    (arms,) = (spec.parse(tomllib.loads(b)) for _, _, b in SPEC_BLOCKS if "[[arms]]" in b)
    assert [c.values.get("arm") for c in arms.cells()] == ["rules"] * 4 + ["wide"] * 4
    (lens,) = (spec.parse(tomllib.loads(b)) for _, _, b in SPEC_BLOCKS if 'task.reasoning = ["none", "cot"]' in b)
    assert [c.config.task.seq_len for c in lens.cells()] == [11, 18]
    for size, *shape in [("tiny", 1, 32, 2, 128), ("small", 2, 32, 4, 128), ("reference", 2, 64, 4, 256), ("large", 4, 128, 8, 512)]:
        assert f"| `{size}`" in SPEC_MD and tuple(shape) == tuple(getattr(presets.MODEL_SIZES[size](), f) for f in ("n_layers", "d_model", "n_heads", "d_mlp"))
    for key, default in spec_fields.RUN_DEFAULTS.items():
        assert f"| `{key}` |" in SPEC_MD, key
        assert default is None or str(default).lower() in SPEC_MD


def test_readme_specs_parse():
    readme = (ROOT / "README.md").read_text()
    found = blocks(readme, "toml")
    assert found
    for _, _, body in found:  # the README's blocks are complete specs, commented alternatives aside
        assert spec.parse(tomllib.loads(body)).cells()
    assert "docs/spec.md" in readme and "docs/worlds.md" in readme


# ----------------------------------------------------------------- worlds
OWNERS = {"config": config, "rules": rules, "world": world, "vocab": vocab, "evaluate": evaluate, "safety": safety}
OWNERS |= {"TaskConfig": config.TaskConfig, "SafetyConfig": config.SafetyConfig}
CITED = sorted(set(re.findall(r"`(config|rules|world|vocab|evaluate|safety|TaskConfig|SafetyConfig)\.(\w+)`", WORLDS_MD)) - {("safety", "coverage")})


def test_worlds_page_cites_names_that_exist():
    assert len(CITED) >= 15
    for module, name in CITED:
        assert hasattr(OWNERS[module], name), f"docs/worlds.md cites {module}.{name}, which does not exist"
    for name in ("RULE_KW", "trigger_ids", "reference", "helpful_value", "HELPFUL_DEFECT", "positions"):
        assert re.search(rf"^(def {name}\(|{name} = )", (ROOT / "tests" / "test_tasks.py").read_text(), re.M), name


@pytest.mark.parametrize(("literal", "names"), [(config.Rule, config.RULES), (config.Helpful, config.HELPFUL), (config.Reasoning, config.REASONING)])
def test_worlds_page_literals_and_tuples_agree(literal, names):
    """The page says the tuples list the Literal's names: a new name goes into both."""
    assert typing.get_args(literal) == names


def test_worlds_page_rule_dispatch_is_as_described():
    task = config.TaskConfig(rule="latent")
    assert rules.active_triggers(task).size == 0  # the fall-back for a name the dict does not hold
    unknown = config.TaskConfig()
    object.__setattr__(unknown, "rule", "no_such_rule")
    with pytest.raises(KeyError):
        rules.threshold(unknown)


WORLDS_PATCHES = dict((arg, body) for mark, arg, body in blocks(WORLDS_MD, "diff") if mark == "patch")
WORLDS_CHECKS = dict((arg, body) for mark, arg, body in blocks(WORLDS_MD, "python") if mark == "check")


def test_worlds_page_has_a_check_per_patch():
    assert set(WORLDS_PATCHES) == set(WORLDS_CHECKS) == {"helpful", "rule"}


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs the patch command")
@pytest.mark.parametrize("name", sorted(WORLDS_PATCHES))
def test_worlds_page_patch_applies_and_works(name, tmp_path):
    shutil.copytree(ROOT / "toymesa", tmp_path / "toymesa", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "test_tasks.py", tmp_path / "tests" / "test_tasks.py")
    done = subprocess.run(["patch", "-p1", "--forward", "--batch"], input=WORLDS_PATCHES[name], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and "fuzz" not in done.stdout, f"docs/worlds.md patch {name!r} no longer applies:\n{done.stdout}{done.stderr}"
    copy = f"import toymesa\nassert toymesa.__file__.startswith({str(tmp_path)!r}), toymesa.__file__  # the patched copy\n"
    (tmp_path / "check.py").write_text(copy + WORLDS_CHECKS[name])
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "check.py"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, f"docs/worlds.md check {name!r} fails on the patched copy:\n{run.stderr[-3000:]}"
