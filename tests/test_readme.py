"""The README and the docs/ pages state what the code does at its defaults.

Each check reads a table or a sentence of the README (or a docs page) and compares it with the
value the code resolves, so that changing a default without the documentation fails here.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from deployments.args import AppArgs, ModelArgs
from rerank_core import config as engine_config
from rerank_core.config import EngineConfig
from rerank_core.cpu import force_cpu_features
from tests.cpu_kinds import CPU_KINDS

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
CONFIGS = ("serve-cpu.yaml", "serve.yaml")
# Linked from the README before the page lands from the work on client shapes; drop it once there.
PENDING_PAGES: set[str] = set()


def table(text: str, heading: str, first_column: str | None = None) -> list[dict[str, str]]:
    """A Markdown table of the section under the line ``heading``: the first one, or the first
    whose header starts with ``first_column``; one dict per row (header -> cell, backticks removed).

    Raises:
        LookupError: no such heading, or no such table in its section.
    """
    lines = text.splitlines()
    try:
        start = lines.index(heading)
    except ValueError:
        raise LookupError(f"no heading {heading!r}") from None
    tables: list[list[list[str]]] = []
    previous = ""
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append([cell.strip().replace("`", "") for cell in line.strip().strip("|").split("|")])
        previous = line
    for rows in tables:
        header, body = rows[0], rows[2:]  # rows[1] is the |---| line
        if first_column is None or header[0] == first_column:
            return [dict(zip(header, row)) for row in body]
    raise LookupError(f"no table{f' starting with {first_column!r}' if first_column else ''} under {heading!r}")


def flat(text: str) -> str:
    """``text`` with every whitespace run as one space (sentences wrap across lines)."""
    return " ".join(text.split())


# --- Defaults by device -----------------------------------------------------------------------


def on_off(value: bool) -> str:
    return "on" if value else "off"


def resolved_defaults(device: str) -> dict[str, str]:
    """What ``EngineConfig()`` resolves on ``device`` ("cpu" under the CPU features in force, or
    "cuda"), in the README's words."""
    config = EngineConfig(device=device)
    dtype = config.torch_dtype()
    where = torch.device(device)
    packed = on_off(config.packed(where, dtype))
    if packed == "on" and config.packed_attention_for(where, dtype) == "varlen":
        packed = "on (varlen)"
    return {
        "dtype: auto": str(dtype).removeprefix("torch."),
        "packed passes": packed,
        "compiled layers": on_off(config.compiled_layers(where, dtype)),
        "batch invariant": on_off(config.invariant(where, dtype)),
    }


def device_defaults_mismatches(rows: list[dict[str, str]]) -> list[str]:
    """Cells of the README's "Defaults by device" table that differ from the code, as messages;
    a row for an unknown device, or a device kind without a row, is a mismatch too."""
    wanted = {f"x86 CPU with {kind}": kind for kind in CPU_KINDS} | {"CUDA GPU": "cuda"}
    problems = [f"no row for {label!r}" for label in wanted if label not in {r["device"] for r in rows}]
    for row in rows:
        kind = wanted.get(row["device"])
        if kind is None:
            problems.append(f"row {row['device']!r} is no device kind the engine tells apart")
            continue
        if kind == "cuda":
            actual = resolved_defaults("cuda")
        else:
            with force_cpu_features(CPU_KINDS[kind]):
                actual = resolved_defaults("cpu")
        problems += [f"{row['device']}: {key} is {value!r} in the code, {row[key]!r} in the README"
                     for key, value in actual.items() if row[key] != value]
    return problems


def test_readme_defaults_by_device_match_the_engine():
    rows = table(README.read_text(), "## Defaults by device")
    assert device_defaults_mismatches(rows) == []


def test_the_device_check_fails_when_a_default_changes(monkeypatch):
    rows = table(README.read_text(), "## Defaults by device")
    monkeypatch.setitem(engine_config.DEFAULT_BATCH_INVARIANT, "cpu", True)
    monkeypatch.setitem(engine_config.DEFAULT_PACKING, "cuda", False)
    problems = device_defaults_mismatches(rows)
    assert len(problems) == len(CPU_KINDS) + 1  # batch invariant on every CPU row, packing on CUDA
    assert "x86 CPU with AVX2: batch invariant is 'on' in the code, 'off' in the README" in problems
    assert "CUDA GPU: packed passes is 'off' in the code, 'on (varlen)' in the README" in problems
    assert device_defaults_mismatches(rows[1:])[0] == f"no row for {rows[0]['device']!r}"


def test_rerank_help_names_the_same_defaults():
    from rerank_cli.main import EPILOG

    assert "batch invariance is off everywhere" in EPILOG  # the README's last column
    assert "CUDA GPU: bfloat16, packed varlen passes, eager layers" in EPILOG


# --- Limits -------------------------------------------------------------------------------------


def arg_default(name: str):
    """The default of an application or per-model argument."""
    fields = AppArgs.model_fields if name in AppArgs.model_fields else ModelArgs.model_fields
    return fields[name].default


def config_value(name: str, config: str):
    """What a shipped config sets for ``name`` (its default where the config leaves it out)."""
    args = yaml.safe_load((REPO / "configs" / config).read_text())["applications"][0]["args"]
    where = args if name in AppArgs.model_fields else args["models"][0]
    return where.get(name, arg_default(name))


def number(cell: str) -> float:
    return float(cell.split()[0].replace(",", ""))


def test_readme_limits_are_the_defaults_and_name_what_the_configs_change():
    rows = table(README.read_text(), "## Use it", "limit")
    assert [r["limit"] for r in rows] == ["max_documents", "max_pairs", "max_request_chars", "max_length",
                                          "request_timeout_s"]
    text = flat(README.read_text())
    for row in rows:
        name = row["limit"]
        assert number(row["default"]) == arg_default(name), name
        for config in CONFIGS:
            value = config_value(name, config)
            if value != arg_default(name):  # the README says where a shipped config differs
                assert f"`{name}`, {value:g} in `configs/{config}`" in text, (name, config, value)


def test_http_api_limits_table_matches_the_defaults_and_both_configs():
    rows = table((DOCS / "http-api.md").read_text(), "## Errors and limits", "limit (arg)")
    assert len(rows) >= 9
    for row in rows:
        name = row["limit (arg)"].split()[0]
        assert number(row["default"]) == arg_default(name), name
        for config in CONFIGS:
            assert number(row[f"configs/{config}"]) == config_value(name, config), (name, config)


def test_configuration_page_states_the_args_defaults():
    """Every row of docs/configuration.md's Serve config table whose default is numbers."""
    rows = table((DOCS / "configuration.md").read_text(), "## Serve config (`args`)")
    checked = 0
    for row in rows:
        names = [name.strip().removeprefix("models[].") for name in row["key"].split(",")]
        values = [value.strip() for value in row["default"].split(",")]
        if len(names) == len(values) and all(re.fullmatch(r"[\d.]+", v) for v in values):
            for name, value in zip(names, values):
                assert float(value) == arg_default(name), name
                checked += 1
    assert checked >= 7


def test_configuration_page_states_the_engine_defaults():
    """Numeric defaults of the Engine settings table are ``EngineConfig``'s; the rest name the device."""
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    rows = table((DOCS / "configuration.md").read_text(), "## Engine settings")
    assert {name.strip() for row in rows for name in row["setting"].split(",")} == set(defaults) - {"device"}
    for row in rows:
        names = [name.strip() for name in row["setting"].split(",")]
        values = [value.strip() for value in row["default"].split(",")]
        if len(names) == len(values) and all(re.fullmatch(r"[\d.]+", v) for v in values):
            assert [float(v) for v in values] == [defaults[n] for n in names], names
        elif row["default"] in ("on", "off"):
            assert defaults[names[0]] is (row["default"] == "on"), names


# --- Requirements -------------------------------------------------------------------------------


def pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def lower_bound(package: str) -> str:
    """The ``>=`` bound pyproject.toml puts on ``package``."""
    for spec in pyproject()["dependencies"]:
        match = re.match(rf"{re.escape(package)}(\[[^\]]*\])?\s*>=\s*([\d.]+)", spec)
        if match:
            return match.group(2)
    raise LookupError(f"{package} has no >= bound in pyproject.toml")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_readme_requirements_are_pyprojects():
    text = flat(README.read_text())
    python = pyproject()["requires-python"].removeprefix(">=")
    assert f"Python ≥ {python}" in text
    assert f"`torch` ≥ {lower_bound('torch')}" in text
    assert f"`ray[serve,data]` ≥ {lower_bound('ray')}" in text
    assert f"`transformers` {lower_bound('transformers').split('.')[0]}.x" in text
    pinned = re.search(r'TORCH_SPEC:-(torch==[^}"]+)', (REPO / "scripts" / "setup").read_text()).group(1)
    assert f"`scripts/setup` pins `{pinned}` when none is installed" in text


# --- Shape and links ----------------------------------------------------------------------------


def test_readme_is_short():
    assert len(README.read_text().splitlines()) < 200


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = heading.strip().lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(line) for line in page.read_text().splitlines() if line.startswith("#")}


def broken_links(page: Path) -> list[str]:
    """Relative links of ``page`` to files that do not exist or to anchors their page lacks."""
    broken = []
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code is not prose
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if str(linked.relative_to(REPO)) in PENDING_PAGES:
            continue
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_links_reach_their_files_and_headings(page):
    assert broken_links(page) == []


def test_readme_config_example_is_a_valid_serve_config():
    """The README's `models[]` entry validates as the application's args, with the settings it names."""
    block = re.search(r"```yaml\n(.*?)```", README.read_text(), flags=re.S).group(1)
    args = AppArgs(**yaml.safe_load(block))
    model = args.models[0]
    assert (model.dtype, model.batch_invariant) == ("auto", True)
    assert model.engine_config().invariant(torch.device("cpu"), torch.float32)
