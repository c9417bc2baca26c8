"""MkDocs hooks for the NSA documentation site (loaded through ``hooks:`` in mkdocs.yml).

They keep the site in step with the repository as files come and go, so ``mkdocs build --strict``
never depends on a hand-kept list:

* **Notebooks.** The jupytext scripts ``notebooks/NN_*.py`` live outside ``docs/``. ``on_files``
  adds each one (or its executed ``.ipynb``, when ``make test-notebooks`` has written a fresh one, so
  that the pages show the figures) as a virtual docs file ``notebooks/NN_*`` (backed by the real file, nothing is
  copied), *before* mkdocs-jupyter turns matching files into notebook pages; ``on_config`` adds a nav
  entry for each notebook that exists, titled by its first Markdown heading.
* **API pages.** ``<!-- api-modules: PACKAGE -->`` in a page expands to one ``::: PACKAGE.module``
  block (mkdocstrings) per public module of that package that imports cleanly on this machine.
* **Includes.** ``<!-- include: PATH -->`` inserts a Markdown file (PATH relative to ``docs/``), e.g. the
  tables that ``scripts/make_doc_figures.py`` generates.
* **Benchmark results.** ``<!-- benchmark-results -->`` expands to the Markdown tables and the PNG plots
  found in ``benchmarks/results/`` (plots also one folder down, e.g. ``h200/``; or to a note that there are
  none yet); the PNGs are added to the site.
* **Measured tables.** ``<!-- bench-json -->`` renders ``benchmarks/results/bench.json`` (written by
  ``python -m benchmarks.run``) as Markdown tables: NSA against each baseline, and the time per part.
* **Lists.** ``<!-- notebook-list -->`` expands to a list of the notebooks that exist.
* **The spec.** If the repository holds ``shared/nsa-spec.md`` (the project's definition), it becomes the
  page ``spec.md`` ("The definition"), listed under "The algorithm".
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import sys
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.nsa")

NOTEBOOK_GLOB = "[0-9][0-9]_*.py"
NAV_SECTION = "Notebooks"
SPEC = "shared/nsa-spec.md"
SPEC_SECTION, SPEC_TITLE = "The algorithm", "The definition (spec)"
# Modules listed first, in reading order; any other public module follows alphabetically.
MODULE_ORDER = {
    "reference": [
        "config",
        "masks",
        "compression",
        "compressed",
        "selection",
        "selected",
        "window",
        "nsa",
        "layer",
        "decode",
        "varlen",
        "softmax",
        "testing",
        "plotting",
    ],
    "optimized": ["compression", "compressed", "selection", "selected", "window", "nsa", "decode"],
}
_MARKER = re.compile(r"<!--\s*(api-modules|include|benchmark-results|bench-json|notebook-list)\s*:?\s*([^>]*?)\s*-->")
BASELINES = {"flash": "FA2 (SDPA flash)", "cudnn": "cuDNN (SDPA)", "flex": "FlexAttention"}
PARTS = ("compressed", "selection", "selected", "window", "core")
_importable: dict[str, bool] = {}


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def _notebooks(config) -> list[Path]:
    """Each notebook's executed ``.ipynb`` (``make test-notebooks`` writes it, outputs and figures included)
    when it is at least as new as its ``.py`` script, else the script itself (rendered without outputs)."""
    scripts = sorted((_root(config) / "notebooks").glob(NOTEBOOK_GLOB))
    executed = [p.with_suffix(".ipynb") for p in scripts]
    return [
        nb if nb.is_file() and nb.stat().st_mtime >= py.stat().st_mtime else py for py, nb in zip(scripts, executed)
    ]


def _notebook_title(path: Path) -> str:
    """The first Markdown heading of a jupytext percent script, else a title made from the file name."""
    in_markdown = False
    for line in path.with_suffix(".py").read_text(encoding="utf-8").splitlines():
        if line.startswith("# %%"):
            in_markdown = "[markdown]" in line or "[md]" in line
            continue
        if in_markdown:
            match = re.match(r"#\s+#{1,2}\s+(.+)", line)
            if match:
                return match.group(1).strip()
    return path.stem.split("_", 1)[-1].replace("_", " ").capitalize()


def _spec(config) -> Path | None:
    path = _root(config) / SPEC
    return path if path.is_file() else None


def _results_dir(config) -> Path:
    return _root(config) / "benchmarks" / "results"


# --- nav and files ---------------------------------------------------------------------------------------


def on_config(config):
    if _spec(config) is not None and config.nav is not None:
        for item in config.nav:
            if isinstance(item, dict) and isinstance(item.get(SPEC_SECTION), list):
                item[SPEC_SECTION].append({SPEC_TITLE: "spec.md"})
                break
    entries = [{_notebook_title(p): f"notebooks/{p.name}"} for p in _notebooks(config)]
    if not entries or config.nav is None:
        return config
    for i, item in enumerate(config.nav):
        if isinstance(item, dict) and NAV_SECTION in item:
            current = item[NAV_SECTION]
            overview = current if isinstance(current, list) else [{"Overview": current}]
            config.nav[i] = {NAV_SECTION: [*overview, *entries]}
            break
    else:
        config.nav.append({NAV_SECTION: entries})
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns matching files into notebook pages
def on_files(files: Files, config) -> Files:
    # Real File objects rooted at the repository (not File.generated): mkdocs-jupyter wraps them and
    # reads them through src_dir, which a generated file does not have.
    root = str(_root(config))
    paths = [p for p in _notebooks(config)]
    paths += _result_plots(_results_dir(config))
    for path in paths:
        src = path.relative_to(root).as_posix()
        files.append(File(src, src_dir=root, dest_dir=config.site_dir, use_directory_urls=config.use_directory_urls))
    spec = _spec(config)
    if spec is not None and files.get_file_from_path("spec.md") is None:
        note = (
            '!!! info "The project\'s definition"\n    This page is `shared/nsa-spec.md`, included verbatim: '
            "the document that `reference/`, `optimized/`, the tests and these pages follow.\n\n"
        )
        text = spec.read_text(encoding="utf-8")
        title, _, body = text.partition("\n")  # keep the spec's own H1 first, then the note
        files.append(File.generated(config, "spec.md", content=f"{title}\n\n{note}{body}"))
    return files


# --- markers ---------------------------------------------------------------------------------------------


def _module_importable(name: str) -> bool:
    if name not in _importable:
        try:
            importlib.import_module(name)
            _importable[name] = True
        except Exception as exc:  # a module that cannot import here gets no API section (logged, not fatal)
            log.info("API pages: skipping %s (%s: %s)", name, type(exc).__name__, exc)
            _importable[name] = False
    return _importable[name]


def _public_modules(config, package: str) -> list[str]:
    folder = _root(config) / package
    if not (folder / "__init__.py").is_file():
        return []
    names = [p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")]
    order = MODULE_ORDER.get(package, [])
    names.sort(key=lambda n: (order.index(n) if n in order else len(order), n))
    return names


def _api_modules(config, package: str) -> str:
    root = str(_root(config))
    if root not in sys.path:
        sys.path.insert(0, root)
    if not _public_modules(config, package) or not _module_importable(package):
        return (
            f'!!! note "No API yet"\n    The `{package}` package does not import on the machine that built '
            "this site yet; its API appears here once it does.\n"
        )
    blocks = []
    for name in _public_modules(config, package):
        dotted = f"{package}.{name}"
        if _module_importable(dotted):
            blocks.append(f"## `{dotted}`\n\n::: {dotted}\n    options:\n      show_root_heading: false\n")
    return "\n".join(blocks)


def _result_plots(results: Path) -> list[Path]:
    """The PNG plots in ``benchmarks/results/`` and one folder down (e.g. ``h200/``, another card's runs)."""
    if not results.is_dir():
        return []
    return sorted(results.glob("*.png")) + sorted(results.glob("*/*.png"))


def _benchmark_results(config, page) -> str:
    results = _results_dir(config)
    tables = sorted(results.glob("*.md")) if results.is_dir() else []
    plots = _result_plots(results)
    if not tables and not plots:
        return (
            '!!! warning "Not yet measured"\n    `benchmarks/results/` holds no tables or plots yet. '
            "Run `make bench` on the GPU machine; its Markdown tables and PNG plots appear here.\n"
        )
    depth = page.file.src_uri.count("/")
    prefix = "../" * depth
    parts = []
    for path in tables:
        parts.append(f"### `{path.name}`\n\n{path.read_text(encoding='utf-8').strip()}\n")
    for path in plots:
        name = path.relative_to(results).as_posix()  # h200/decode_default.png: another card's results
        parts.append(f"![{name}]({prefix}benchmarks/results/{name})\n\n`{name}`\n")
    return "\n".join(parts)


def _ms(value) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "–"


def _bench_tables(data: dict) -> str:
    """Markdown tables from ``bench.json`` (``python -m benchmarks.run``): NSA core vs baselines, then per part."""
    env = data.get("env", {})
    keys = ("card", "driver", "cuda", "torch", "triton", "python", "git_commit", "timestamp_utc")
    lines = [
        '!!! info "Measured: generated from `benchmarks/results/bench.json` when this site was built"',
        "    " + ", ".join(f"{k}: `{env[k]}`" for k in keys if env.get(k)),
        f"    {'(the run stopped early: some lengths are missing)' if data.get('stopped_early') else ''}",
    ]
    runs = data.get("runs", [])
    if len(runs) > 1:  # a merge (python -m benchmarks.plot --merged): each (config, length) comes from one run
        lines.append(f"    Merged from {len(runs)} runs on this card; each config and length from one of them:")
        for run in runs:
            argv = " ".join(run.get("argv") or [])
            lines.append(f"    `{run.get('git_commit')}` at {run.get('timestamp_utc')}: `{argv}`;")
    lines.append("")
    records = data.get("records", [])
    for cfg in data.get("configs", []):
        name = cfg.get("name", "?")
        recs = [r for r in records if r.get("config") == name]
        ms = {(r["seq_len"], r["impl"], r["part"], r["pass"]): r.get("ms") for r in recs}
        lengths = sorted({r["seq_len"] for r in recs})
        if not lengths:
            continue
        shape = ", ".join(f"{k} = {v}" for k, v in cfg.items() if k not in ("name", "nsa") and not isinstance(v, dict))
        lines += [f"#### Config `{name}`", "", f"{shape}; NSA sizes: `{cfg.get('nsa')}`", ""]
        head = "| T | pass | NSA core (ms) | " + " | ".join(f"{v} (ms) | speedup" for v in BASELINES.values()) + " |"
        lines += [head, "|---:|---|---:|" + "---:|---:|" * len(BASELINES)]
        for T in lengths:
            for pass_ in ("fwd", "bwd"):
                nsa = ms.get((T, "nsa", "core", pass_))
                cells = []
                for b in BASELINES:
                    base = ms.get((T, b, "full", pass_))
                    cells.append(f"{_ms(base)} | {base / nsa:.1f}x" if base and nsa else f"{_ms(base)} | –")
                lines.append(f"| {T // 1024}k | {pass_} | {_ms(nsa)} | " + " | ".join(cells) + " |")
        lines += ["", "| T | pass | " + " | ".join(PARTS) + " (ms) |", "|---:|---|" + "---:|" * len(PARTS)]
        for T in lengths:
            for pass_ in ("fwd", "bwd"):
                cells = [_ms(ms.get((T, "nsa", part, pass_))) for part in PARTS]
                lines.append(f"| {T // 1024}k | {pass_} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _bench_json(config) -> str:
    path = _results_dir(config) / "bench.json"
    if not path.is_file():
        return (
            '!!! warning "Not yet measured"\n    `benchmarks/results/bench.json` does not exist yet: run `make bench` '
            "on the GPU machine and rebuild; its tables appear here.\n"
        )
    try:
        return _bench_tables(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # a format change must not break the build
        log.info("bench-json: could not render %s (%s: %s)", path, type(exc).__name__, exc)
        return f'!!! warning "Could not read bench.json"\n    {type(exc).__name__}: the file\'s format changed.\n'


def _notebook_list(config, page) -> str:
    notebooks = _notebooks(config)
    if not notebooks:
        return '!!! note "No notebooks yet"\n    The notebooks appear here as they are added to `notebooks/`.\n'
    depth = page.file.src_uri.count("/")
    prefix = "../" * depth
    return "\n".join(
        f"{k}. [{_notebook_title(p)}]({prefix}notebooks/{p.name}) (`notebooks/{p.name}`)"
        for k, p in enumerate(notebooks, 1)
    )


def on_page_markdown(markdown: str, page, config, files) -> str:
    docs_dir = Path(config.docs_dir)

    def expand(match: re.Match) -> str:
        kind, arg = match.group(1), match.group(2).strip()
        if kind == "api-modules":
            return _api_modules(config, arg)
        if kind == "include":
            return (docs_dir / arg).read_text(encoding="utf-8")
        if kind == "benchmark-results":
            return _benchmark_results(config, page)
        if kind == "bench-json":
            return _bench_json(config)
        return _notebook_list(config, page)

    return _MARKER.sub(expand, markdown)
