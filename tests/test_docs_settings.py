"""docs/settings.md names every setting the code has, and only those, with their defaults."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from producer import settings as settings_module
from producer.settings import FleetSettings, ModelConfig

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "settings.md"
ENV_SECTION = "## Environment variables"
MODEL_SECTION = "## Per-model fields"
FLEET_VAR = re.compile(r"\bFLEET_[A-Z0-9_]*[A-Z0-9]\b")
# FLEET_ variables a module reads straight from the environment, outside the settings object.
DIRECT_READ = re.compile(r"""environ(?:\.get\(|\[)\s*["'](FLEET_[A-Z0-9_]+)["']""")


def env_names(name: str, field: FieldInfo) -> list[str]:
    """The environment variables pydantic-settings reads ``field`` from."""
    alias = field.validation_alias or field.alias
    if alias is None:
        return [f"{FleetSettings.model_config.get('env_prefix', '')}{name}".upper()]
    choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
    # An alias replaces the prefixed name; an AliasPath names a nested key, not a variable.
    return [c.upper() for c in choices if isinstance(c, str)]


def settings_variables() -> dict[str, FieldInfo | None]:
    """Every FLEET_ variable the project reads: the settings object's and the direct reads."""
    found: dict[str, FieldInfo | None] = {}
    for name, field in FleetSettings.model_fields.items():
        for var in env_names(name, field):
            found[var] = field
    for package in ("producer", "workers"):
        for source in (ROOT / package).rglob("*.py"):
            for var in DIRECT_READ.findall(source.read_text()):
                found.setdefault(var, None)
    return found


def model_fields(model: type[BaseModel] = ModelConfig, prefix: str = "") -> dict[str, FieldInfo]:
    """Per-model keys of the fleet config, nested settings models flattened as ``a.b``.

    Nested models defined in ``producer.settings`` are settings and are listed field by field;
    ``defaults`` holds the wire schema's sampling knobs, documented with the schema.
    """
    found: dict[str, FieldInfo] = {}
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        nested = field.annotation
        if (isinstance(nested, type) and issubclass(nested, BaseModel)
                and nested.__module__ == settings_module.__name__):
            found.update(model_fields(nested, key + "."))
        else:
            found[key] = field
    return found


def section(text: str, heading: str) -> str:
    """The part of the document under ``heading``, up to the next heading of its level."""
    assert heading in text, f"docs/settings.md has no section {heading!r}"
    body = text.split(heading, 1)[1]
    return re.split(r"^## ", body, maxsplit=1, flags=re.M)[0]


def table_rows(text: str) -> dict[str, str]:
    """First cell (a `code` name) -> default cell, for every table row of ``text``."""
    rows: dict[str, str] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and re.fullmatch(r"`[^`]+`", cells[0]):
            rows[cells[0].strip("`")] = cells[1]
    return rows


def documented_default(field: FieldInfo) -> str | None:
    """How the default cell must start, for defaults that read as one value; None: not checked."""
    if field.is_required():
        return "required"
    default = field.default
    if default is PydanticUndefined:  # a default_factory
        return None
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, int | float | str):
        return f"`{default}`"
    return None


def check(documented: dict[str, str], actual: dict[str, Any], what: str) -> list[str]:
    """What differs between the names (and plain defaults) documented and the code's."""
    problems = [f"{what} {n} is not in docs/settings.md"
                for n in sorted(set(actual) - set(documented))]
    problems += [f"docs/settings.md names {what} {n}, which the settings object does not have"
                 for n in sorted(set(documented) - set(actual))]
    for name in sorted(set(actual) & set(documented)):
        field = actual[name]
        expected = documented_default(field) if field is not None else None
        if expected is not None and not documented[name].startswith(expected):
            problems.append(f"{what} {name}: docs/settings.md gives the default "
                            f"{documented[name]!r}, the code {expected!r}")
    return problems


def test_every_fleet_variable_is_documented_and_exists() -> None:
    text = DOC.read_text()
    variables = settings_variables()
    problems = check(table_rows(section(text, ENV_SECTION)), variables, "variable")
    # Anywhere on the page: no FLEET_ name the project does not read.
    problems += [f"docs/settings.md mentions {v}, which the project does not read"
                 for v in sorted(set(FLEET_VAR.findall(text)) - set(variables))]
    assert not problems, "\n".join(problems)


def test_the_readme_and_docs_name_only_variables_that_exist() -> None:
    variables = settings_variables()
    problems = [f"{page.relative_to(ROOT)} mentions {v}, which the project does not read"
                for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
                for v in sorted(set(FLEET_VAR.findall(page.read_text())) - set(variables))]
    assert not problems, "\n".join(problems)


def test_every_model_field_is_documented_and_exists() -> None:
    documented = table_rows(section(DOC.read_text(), MODEL_SECTION))
    problems = check(documented, model_fields(), "per-model field")
    assert not problems, "\n".join(problems)


def test_the_check_sees_a_missing_and_an_unknown_name() -> None:
    fields = model_fields()
    documented = {name: "`x`" for name in fields if name != "seed"} | {"no_such_field": "unset"}
    problems = "\n".join(check(documented, fields, "per-model field"))
    assert "per-model field seed is not in docs/settings.md" in problems
    assert "no_such_field, which the settings object does not have" in problems
