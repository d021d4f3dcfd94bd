"""The extras install what each feature imports, and every install line in the docs names existing extras.

fvdiffusion is installed from its repository (``pip install -e '.[extra,...]'``), not from a
package index, so no doc or message may tell users to ``pip install 'fvdiffusion[...]'``.
Whether each named requirement exists on the package index was checked by hand (pip index
versions, isolated from local mirrors) when the extras last changed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _extras() -> dict[str, list[str]]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def _required_extras() -> list[tuple[str, str, str]]:
    """(file, module, extra) of every require("module", "extra") call in the package, and of every
    _ClipBackbone(..., extra="...") (which requires transformers)."""
    found = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            where = str(path.relative_to(ROOT))
            if name == "require" and len(node.args) == 2 and all(isinstance(a, ast.Constant) for a in node.args):
                found.append((where, node.args[0].value, node.args[1].value))
            if name == "_ClipBackbone":
                found += [(where, "transformers", kw.value.value) for kw in node.keywords
                          if kw.arg == "extra" and isinstance(kw.value, ast.Constant)]
    return found


# the distribution that provides each module a require() call names
DISTRIBUTION = {"transformers": "transformers", "diffusers": "diffusers", "safetensors": "safetensors",
                "PIL": "pillow"}


def test_every_extra_the_package_names_exists_and_installs_the_module():
    extras = _extras()
    calls = _required_extras()
    assert {extra for _, _, extra in calls} >= {"clip", "pickscore", "aesthetic", "diffusers"}, calls
    for where, module, extra in calls:
        assert extra in extras, f"{where}: require({module!r}, {extra!r}) names an extra pyproject.toml lacks"
        dist = DISTRIBUTION[module.split(".")[0]]
        assert dist in _names(extras[extra]) | {"safetensors"}, f"extra {extra!r} does not install {dist}"


@pytest.mark.parametrize("extra", ["clip", "pickscore", "aesthetic"])
def test_model_reward_extras_install_transformers_and_the_hub_client(extra):
    assert {"transformers", "huggingface-hub"} <= _names(_extras()[extra])


def test_the_diffusers_extra_installs_what_a_pipeline_needs():
    assert {"diffusers", "transformers"} <= _names(_extras()["diffusers"])


def test_no_extra_names_the_imagereward_package():
    """ImageReward was removed (docs/diffusers.md): its package does not run on transformers 5."""
    for extra, requirements in _extras().items():
        assert "image-reward" not in _names(requirements), extra


def _install_lines(text: str) -> list[str]:
    return re.findall(r"pip install[^\n`]*", text)


def test_install_lines_name_existing_extras_and_install_from_the_clone():
    extras = set(_extras())
    seen = []
    for path in DOCS:
        for line in _install_lines(path.read_text(encoding="utf-8")):
            assert "fvdiffusion[" not in line, f"{path.name}: {line!r} (fvdiffusion is not on a package index)"
            for group in re.findall(r"\.\[([\w,-]+)\]", line):
                for extra in group.split(","):
                    assert extra in extras, f"{path.name}: {line!r} names extra {extra!r}"
                    seen.append(extra)
    assert "pip install -e '.[diffusers,clip]'" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert {"diffusers", "clip"} <= set(seen)


def test_no_message_in_the_package_points_at_a_package_index():
    offenders = [f"{p.relative_to(ROOT)}: {line.strip()}" for p in sorted((ROOT / "src").rglob("*.py"))
                 for line in p.read_text(encoding="utf-8").splitlines() if "fvdiffusion[" in line]
    assert offenders == []
