"""Task logic: label alignment, decoding from numpy logits, scoring on hand-checked cases."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_text_examples, tiny_model

from pipeline.data import TextExample, TokenExample
from pipeline.errors import InputError
from pipeline.tasks import (
    IGNORE_INDEX,
    cosine_rows,
    get_task,
    id2label_of,
    linear_probe_accuracy,
    load_tokenizer,
    mean_pool,
)

LABELS = ["B-LOC", "B-PER", "I-PER", "O"]


@pytest.fixture(scope="module")
def ner_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("ner"), head="token", labels=LABELS, tokenizer="words")


def test_get_task_and_unsupported_tasks():
    assert get_task("token-classification").metric_name == "f1"
    assert get_task("text-classification").metric_name == "accuracy"
    assert get_task("feature-extraction").metric_name == "probe_accuracy"
    assert get_task("text-generation").metric_name == "perplexity"
    assert get_task("text-generation").lower_is_better == ("perplexity",)
    assert not get_task("question-answering").scorable  # exported and quantized, not scored yet
    assert not get_task("text-generation").trainable
    with pytest.raises(InputError, match="unknown task 'nope'"):
        get_task("nope")


def test_labels_on_first_subword_only(ner_dir):
    task = get_task("token-classification")
    tokenizer = load_tokenizer(ner_dir)
    example = TokenExample(("bobx", "visited", "parisy"), ("B-PER", "O", "B-LOC"))
    label2id = {label: i for i, label in enumerate(LABELS)}
    encoded = task.encode(tokenizer, [example], max_length=32, label2id=label2id)
    tokens = tokenizer.convert_ids_to_tokens(encoded.features["input_ids"][0])
    assert tokens == ["[CLS]", "bob", "##x", "visited", "paris", "##y", "[SEP]"]
    assert encoded.labels[0] == [IGNORE_INDEX, 1, IGNORE_INDEX, 3, 0, IGNORE_INDEX, IGNORE_INDEX]
    assert encoded.word_ids[0] == [None, 0, 0, 1, 2, 2, None]
    with pytest.raises(InputError, match="tag 'B-ORG' is not one of the model's labels"):
        task.encode(tokenizer, [TokenExample(("acme",), ("B-ORG",))], 32, label2id=label2id)


def test_batches_pad_inputs_and_labels(ner_dir):
    task = get_task("token-classification")
    tokenizer = load_tokenizer(ner_dir)
    examples = [
        TokenExample(("bob",), ("B-PER",)),
        TokenExample(("bob", "met", "alice"), ("B-PER", "O", "B-PER")),
    ]
    encoded = task.encode(tokenizer, examples, 32, label2id={label: i for i, label in enumerate(LABELS)})
    batch = next(encoded.batches(8, with_labels=True))
    assert batch["input_ids"].shape == (2, 5) and batch["input_ids"].dtype == np.int64
    assert batch["attention_mask"].tolist()[0] == [1, 1, 1, 0, 0]
    assert batch["input_ids"][0, 3:].tolist() == [tokenizer.pad_token_id] * 2
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert [len(b["input_ids"]) for b in encoded.batches(1)] == [1, 1]


def test_ner_decoding_from_numpy_logits_and_truncation(ner_dir):
    task = get_task("token-classification")
    tokenizer = load_tokenizer(ner_dir)
    example = TokenExample(("bobx", "met", "alice", "in", "paris"), ("B-PER", "O", "B-PER", "O", "B-LOC"))
    encoded = task.encode(tokenizer, [example], max_length=5)  # [CLS] bob ##x met [SEP]: 3 words cut
    want = [3, 1, 0, 3, 3]  # per position: [CLS]=O, bob=B-PER, ##x=B-LOC (ignored), met=O, [SEP]
    logits = np.full((1, 5, len(LABELS)), -1.0, dtype=np.float32)
    logits[0, np.arange(5), want] = 5.0
    predictions = task.predict([logits], encoded, id2label_of(ner_dir))
    assert predictions == [["B-PER", "O", "O", "O", "O"]]  # truncated words are predicted O
    scores = task.score(predictions, [example])
    assert scores["precision"] == 1.0 and scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(0.5)


def test_seqeval_scores_hand_checked():
    task = get_task("token-classification")
    truth = [
        TokenExample(("bob", "smith", "in", "paris"), ("B-PER", "I-PER", "O", "B-LOC")),
        TokenExample(("alice",), ("B-PER",)),
    ]
    # entity (bob smith, PER) right; paris missed; alice right; a spurious LOC on "in"
    predictions = [["B-PER", "I-PER", "B-LOC", "O"], ["B-PER"]]
    scores = task.score(predictions, truth)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["token_accuracy"] == pytest.approx(3 / 5)
    report = task.report(predictions, truth)
    assert "PER" in report and "LOC" in report and "micro avg" in report


def test_classification_decode_and_scores():
    task = get_task("text-classification")
    examples = [TextExample("x", "a"), TextExample("y", "a"), TextExample("z", "b"), TextExample("w", "c")]
    logits = [np.array([[3.0, 0, 0], [0, 2.0, 0]]), np.array([[0, 1.0, 0], [0, 0, 1.0]])]  # two batches
    encoded = type("E", (), {})()  # predict needs only the outputs for classification
    predictions = task.predict(logits, encoded, {0: "a", 1: "b", 2: "c"})
    assert predictions == ["a", "b", "b", "c"]
    scores = task.score(predictions, examples)
    assert scores["accuracy"] == pytest.approx(0.75)
    # per-class F1: a 2/3, b 2/3, c 1 -> macro 7/9
    assert scores["macro_f1"] == pytest.approx(7 / 9)
    assert "macro avg" in task.report(predictions, examples)


def test_mean_pool_cosine_and_probe():
    hidden = np.array([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]], dtype=np.float32)
    mask = np.array([[1, 1, 0]])
    assert mean_pool(hidden, mask).tolist() == [[2.0, 1.0]]
    assert cosine_rows(np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[2.0, 0.0], [-1.0, -1.0]])).tolist() == [
        pytest.approx(1.0),
        pytest.approx(-1.0),
    ]
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(5, 0.1, (10, 4)), rng.normal(-5, 0.1, (10, 4))])
    labels = ["a"] * 10 + ["b"] * 10
    assert linear_probe_accuracy(x, labels) == 1.0
    assert linear_probe_accuracy(x, [None] * 20) is None


def test_feature_extraction_torch_matches_numpy_pooling(bare_dir):
    task = get_task("feature-extraction")
    model = task.load_model(bare_dir)
    tokenizer = load_tokenizer(bare_dir)
    examples = make_text_examples(12)
    encoded = task.encode(tokenizer, examples, 16)
    embeddings = task.run(task.torch_forward(model), encoded, batch_size=5)
    assert embeddings.shape == (12, 32)
    one_by_one = task.run(task.torch_forward(model), encoded, batch_size=1)
    np.testing.assert_allclose(embeddings, one_by_one, atol=1e-5)  # padding does not leak into the mean
    scores = task.score(embeddings, examples, reference=one_by_one)
    assert scores["cosine_min"] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= scores["probe_accuracy"] <= 1.0


def test_load_model_heads(bare_dir, ner_dir, tmp_path):
    task = get_task("token-classification")
    with pytest.raises(InputError, match="has no token-classification head; fine-tune it first"):
        task.load_model(bare_dir)
    model = task.load_model(bare_dir, labels=["B-X", "O"])
    assert model.config.id2label == {0: "B-X", 1: "O"} and model.config.label2id == {"B-X": 0, "O": 1}
    assert id2label_of(task.load_model(ner_dir).config) == LABELS
    with pytest.raises(InputError, match="not a Hugging Face checkpoint"):
        task.load_model(tmp_path)
    text = get_task("text-classification").load_model(bare_dir, labels=["neg", "pos"])
    assert type(text).__name__ == "BertForSequenceClassification" and text.config.num_labels == 2


def test_check_labels_catches_name_mismatch():
    task = get_task("text-classification")
    task.check_labels({0: "negative", 1: "positive"}, [TextExample("x", "negative")])
    with pytest.raises(InputError, match="labels 'negative' are not among the model's labels"):
        task.check_labels({0: "NEGATIVE", 1: "POSITIVE"}, [TextExample("x", "negative")])
    ner = get_task("token-classification")
    with pytest.raises(InputError, match="'B-ORG'"):
        ner.check_labels(LABELS, [TokenExample(("acme",), ("B-ORG",))])
    get_task("feature-extraction").check_labels([], [TextExample("x", "anything")])
