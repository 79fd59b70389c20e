"""Classification fine-tuning pieces: reading labelled files, the head, what trains, the last real
token, and every bad input named by file and line."""

from __future__ import annotations

import pytest
import torch

from helpers import sharp_model, tiny_config
from scratchgpt import GPTModel, load_model_from_checkpoint, save_checkpoint
from scratchgpt.checkpoint import checkpoint_task, save_model
from scratchgpt.tasks.classify import (
    ClassifyTask,
    balance,
    calc_accuracy_loader,
    classification_collate_fn,
    classify_probabilities,
    classify_review,
    label_names,
    last_token_logits,
    load_classification_data,
    read_texts,
    replace_head,
    set_trainable_layers,
)

PAD = 50256


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_csv_tsv_json_lines_and_headerless_files(tmp_path):
    csv_file = write(tmp_path, "a.csv", 'label,text\nspam,"Win, now"\nham,"see you\nat 5"\n')
    assert load_classification_data(csv_file).items == [{"text": "Win, now", "label": "spam"},
                                                        {"text": "see you\nat 5", "label": "ham"}]
    jsonl = write(tmp_path, "a.jsonl", '{"review": "great", "stars": 5}\n\n{"review": "bad", "stars": 1}\n')
    records = load_classification_data(jsonl, "review", "stars")
    assert records.items == [{"text": "great", "label": 5}, {"text": "bad", "label": 1}]
    assert records.where == ["line 1", "line 3"] and label_names(records) == [1, 5]
    tsv = write(tmp_path, "SMSSpamCollection.tsv", "ham\tOk lar...\nspam\tFree entry\n")  # the walkthrough's file
    assert load_classification_data(tsv, text_column="1", label_column="0").items == [
        {"text": "Ok lar...", "label": "ham"}, {"text": "Free entry", "label": "spam"}]


@pytest.mark.parametrize("name, text, message", [
    ("d.csv", "text,label\nhello,a\nworld\n", "d.csv: line 3: missing column 'label' (has: text)"),
    ("d.csv", "body,label\nhello,a\n", "d.csv: line 2: missing column 'text' (has: body, label)"),
    ("d.csv", "text,label\nhello,a\n  ,b\n", "d.csv: line 3: empty text"),
    ("d.tsv", "text\tlabel\nhello\t\n", "d.tsv: line 2: empty label"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": 1.5}\n',
     "d.jsonl: line 2: a label must be a string or an integer, got 1.5"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b" "label": "y"}\n', "d.jsonl: line 2: malformed JSON"),
    ("d.json", '[{"text": "a", "label": "x"}, {"text": ["b"], "label": "y"}]',
     "d.json: record 2: the text must be a string, got list"),
    ("d.csv", 'text,label\n"unclosed,a\n', "d.csv: line 2: missing column 'label'"),
])
def test_bad_records_are_named_by_file_and_line(tmp_path, name, text, message):
    with pytest.raises(ValueError) as err:
        load_classification_data(write(tmp_path, name, text))
    assert str(err.value).startswith(str(tmp_path / message)), err.value


def test_fewer_than_two_classes_and_unseen_val_labels_are_refused(tmp_path, tokenizer):
    one = load_classification_data(write(tmp_path, "one.csv", "text,label\na,x\nb,x\n"))
    with pytest.raises(ValueError, match=r"one.csv: a classifier needs at least two classes; the training "
                                         r"records have only \['x'\]"):
        ClassifyTask(one, one, tokenizer, 32)
    train = load_classification_data(write(tmp_path, "train.csv", "text,label\na,x\nb,y\n"))
    val = load_classification_data(write(tmp_path, "val.csv", "text,label\na,x\nb,z\n"))
    with pytest.raises(ValueError, match=r"val.csv: line 3: label 'z' does not occur in the training data "
                                         r"\(labels: x, y\)"):
        ClassifyTask(train, val, tokenizer, 32)
    mixed = load_classification_data(write(tmp_path, "mixed.jsonl", '{"text": "a", "label": "x"}\n'
                                                                     '{"text": "b", "label": 2}\n'))
    with pytest.raises(ValueError, match=r"mixed.jsonl: line 2: label 2 is a int, but line 1's is a str"):
        label_names(mixed)


def test_balance_undersamples_every_class_to_the_smallest(tmp_path):
    rows = "".join(f"t{i},{'a' if i < 7 else 'b' if i < 10 else 'c'}\n" for i in range(14))
    records = load_classification_data(write(tmp_path, "d.csv", "text,label\n" + rows))
    balanced = balance(records, seed=1)
    labels = [item["label"] for item in balanced.items]
    assert sorted(labels) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    lines = [int(w.split()[1]) for w in balanced.where]
    assert lines == sorted(lines)  # file order kept, places kept
    assert balanced.items == balance(records, seed=1).items != balance(records, seed=2).items


def test_new_head_and_what_trains():
    model = replace_head(GPTModel(tiny_config(n_layers=3)), 4)
    assert tuple(model(torch.tensor([[1, 2, 3]])).shape) == (1, 3, 4)
    set_trainable_layers(model)  # the walkthrough's: last block, final norm, head
    trained = {name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("trf_blocks") else "")
               for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {"trf_blocks.2", "final_norm", "out_head"}
    set_trainable_layers(model, "last-2")
    assert {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("trf_blocks")} == \
        {n for n, _ in model.named_parameters() if n.startswith(("trf_blocks.1.", "trf_blocks.2."))}
    set_trainable_layers(model, "all")
    assert all(p.requires_grad for p in model.parameters())
    for bad in ("last-4", "first-1", "last-x", "some"):
        with pytest.raises(ValueError, match="--train-layers must be 'all' or 'last-N' with N from 0 to 3"):
            set_trainable_layers(model, bad)


def test_logits_come_from_each_rows_last_real_token_whatever_the_padding():
    model = replace_head(sharp_model(seed=3, vocab_size=PAD + 1), 3).eval()
    texts = [[5, 99, 1000, 7, 4521, 12, 8], [311], [42, 42, 17], [9000, 1, 2, 3, 4]]
    inputs, lengths, _ = classification_collate_fn([(t, 0) for t in texts])
    with torch.no_grad():
        batched = torch.softmax(last_token_logits(model, inputs, lengths), -1)
        alone = torch.cat([torch.softmax(last_token_logits(model, torch.tensor([t])), -1) for t in texts])
        extra_pad = torch.cat([inputs, torch.full((4, 9), PAD)], dim=1)  # more padding changes nothing
        padded_more = torch.softmax(last_token_logits(model, extra_pad, lengths), -1)
        walkthrough = torch.softmax(model(inputs)[:, -1, :], -1)  # its last position: a pad token when shorter
    assert torch.allclose(batched, alone, atol=1e-5) and torch.allclose(padded_more, alone, atol=1e-5)
    assert (walkthrough - alone)[1:].abs().max() > 1e-2  # the bug this avoids (issues #566, #990)
    assert torch.allclose(walkthrough[0], alone[0], atol=1e-5)  # the longest row has no padding


def test_accuracy_loader_takes_our_batches_and_the_walkthroughs():
    model = replace_head(sharp_model(seed=1, vocab_size=PAD + 1), 2).eval()
    texts = [[5, 99, 1000], [311, 7], [42, 42, 17], [9, 1]]
    with torch.no_grad():
        predicted = [int(last_token_logits(model, torch.tensor([t])).argmax()) for t in texts]
    labels = [predicted[0], 1 - predicted[1], predicted[2], predicted[3]]  # three of four right
    ours = [classification_collate_fn(list(zip(texts[:2], labels[:2]))),
            classification_collate_fn(list(zip(texts[2:], labels[2:])))]
    assert calc_accuracy_loader(ours, model, "cpu") == 0.75
    assert calc_accuracy_loader(ours, model, "cpu", num_batches=1) == 0.5
    equal_length = [(torch.tensor([t[:2] for t in texts]), torch.tensor(labels))]  # (inputs, labels)
    with torch.no_grad():
        expected = (model(equal_length[0][0])[:, -1].argmax(-1) == equal_length[0][1]).float().mean().item()
    assert calc_accuracy_loader(equal_length, model, "cpu") == expected


def test_a_classifier_checkpoint_loads_with_its_head_and_labels(tmp_path):
    model = replace_head(GPTModel(tiny_config(vocab_size=PAD + 1)), 3).eval()
    task = {"kind": "classify", "labels": ["neg", "neu", "pos"]}
    save_checkpoint(tmp_path / "best.pt", model, task=task)
    save_model(tmp_path / "model.pth", model, task=task)
    idx = torch.tensor([[1, 2, 3, 4]])
    for name in ("best.pt", "model.pth"):
        loaded = load_model_from_checkpoint(tmp_path / name)
        assert checkpoint_task(tmp_path / name) == task
        assert torch.equal(loaded(idx), model(idx)) and loaded.out_head.weight.shape == (3, 48)
    save_checkpoint(tmp_path / "lm.pt", GPTModel(tiny_config()))
    assert checkpoint_task(tmp_path / "lm.pt") == {}


def test_classify_review_names_the_most_likely_class(tokenizer):
    model = replace_head(sharp_model(seed=3, vocab_size=PAD + 1), 2).eval()
    texts = ["You are a winner! Claim your free prize now", "See you at lunch tomorrow?", "ok"]
    probabilities = classify_probabilities(texts, model, tokenizer)
    assert torch.allclose(probabilities.sum(dim=-1), torch.ones(3))
    for text, row in zip(texts, probabilities):
        assert classify_review(text, model, tokenizer, "cpu") == ("not spam", "spam")[int(row.argmax())]
        assert classify_review(text, model, tokenizer, "cpu", labels=[0, 1]) == int(row.argmax())
    with pytest.raises(ValueError, match="cannot classify an empty text"):
        classify_probabilities(["fine", ""], model, tokenizer)


def test_texts_to_classify_come_from_lines_or_a_column(tmp_path):
    assert read_texts(write(tmp_path, "t.txt", "first text\n\n  \nsecond, text\n")) == ["first text", "second, text"]
    assert read_texts(write(tmp_path, "t.csv", "id,body\n1,hello\n2,world\n"), "body") == ["hello", "world"]
    with pytest.raises(ValueError, match=r"t.jsonl: line 2: missing column 'text' \(has: body\)"):
        read_texts(write(tmp_path, "t.jsonl", '{"text": "a"}\n{"body": "b"}\n'))
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff broken\n")
    with pytest.raises(ValueError, match=r"bad.txt: not UTF-8 text \(byte 5: invalid start byte\)"):
        read_texts(tmp_path / "bad.txt")
