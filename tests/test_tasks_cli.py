"""`scratchgpt train --task classify|instruct`, `classify`, `generate` and `chat` as a user runs them,
on data made here (tests/task_data.py): models that really learn, checkpoints that resume exactly,
and bad input named by file and line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from scratchgpt import GPTModel, save_checkpoint
from scratchgpt.checkpoint import checkpoint_task, load_model_from_checkpoint, safe_load, shape_for_task
from scratchgpt.cli import main
from scratchgpt.tasks.classify import classify_probabilities
from scratchgpt.generate import generate
from scratchgpt.lora import load_adapter
from scratchgpt.tasks.instruct import format_prompt, generate_response, stream_response
from task_data import classification_records, instruction_records, write_csv

FAST_STEPS, FAST_VAL_LOSS = 150, 2.8  # the default test: the answer's shape and the end-of-text
FULL_STEPS = 600  # the slow test: the answers themselves
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
SMALL = ["--n-layers", "2", "--emb-dim", "64", "--n-heads", "4", "--device", "cpu"]


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "scratchgpt.cli", *args], input=stdin, capture_output=True,
                            text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- classification

@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tokenizer):
    """A small GPT trained from scratch to tell Python's docs from license text (balanced classes)."""
    folder = tmp_path_factory.mktemp("classify")
    write_csv(folder / "paragraphs.csv", classification_records())
    args = ["train", "--task", "classify", "--data", str(folder / "paragraphs.csv"), "--balance",
            "--val-fraction", "0.2", *SMALL, "--drop-rate", "0", "--context-length", "64", "--train-layers", "all",
            "--batch-size", "16", "--lr", "1e-3", "--warmup", "5", "--max-steps", "40", "--eval-every", "40",
            "--eval-iters", "10", "--out-dir", str(folder / "run")]
    assert main(args) == 0
    return folder


def test_a_small_classifier_learns_docs_from_licenses(classifier, capsys):
    before, after = metrics(classifier / "run")[0], metrics(classifier / "run")[-1]
    assert 0.3 <= before["val_accuracy"] <= 0.7  # a coin flip before training (balanced classes)
    assert after["step"] == 40 and after["val_accuracy"] >= 0.95, after
    assert checkpoint_task(classifier / "run" / "best.pt") == {"kind": "classify", "labels": ["docs", "license"]}
    assert checkpoint_task(classifier / "run" / "model.pth")["labels"] == ["docs", "license"]


def test_classify_prints_label_and_probability_and_ignores_padding(classifier, tokenizer):
    model = load_model_from_checkpoint(classifier / "run" / "model.pth")
    texts = ["Permission is hereby granted, free of charge, to any person obtaining a copy of this software",
             "The for statement is used to iterate over the elements of a sequence (such as a string, tuple "
             "or list) or other iterable object.", "THE SOFTWARE IS PROVIDED AS IS", "Built-in Functions"]
    batched = classify_probabilities(texts, model, tokenizer)
    alone = torch.cat([classify_probabilities([t], model, tokenizer) for t in texts])
    assert torch.allclose(batched, alone, atol=1e-5)
    result = run_cli("classify", "--checkpoint", str(classifier / "run" / "best.pt"), "--device", "cpu", texts[1])
    label, probability = result.stdout.strip().split("\t")
    assert label == "docs" and float(probability) > 0.5
    best = load_model_from_checkpoint(classifier / "run" / "best.pt")
    assert float(probability) == pytest.approx(classify_probabilities(texts[1:2], best, tokenizer).max().item(),
                                               abs=1e-4)


def test_classify_a_labelled_file_reports_accuracy(classifier, capsys):
    records = classification_records()
    held_out = records[:20] + records[-20:]  # both classes
    write_csv(classifier / "some.csv", held_out)
    assert main(["classify", "--checkpoint", str(classifier / "run" / "model.pth"), "--file",
                 str(classifier / "some.csv"), "--label-column", "label", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 41 and lines[0].split("\t")[0] in ("docs", "license")
    assert lines[-1].startswith("accuracy ") and float(lines[-1].split()[1].rstrip("%")) >= 90


@pytest.mark.parametrize("files, extra, message", [
    ({"d.csv": "body,label\nhello,a\n"}, [], "d.csv: line 2: missing column 'text' (has: body, label)"),
    ({"d.csv": "text,label\nhello,a\n,b\n"}, [], "d.csv: line 3: empty text"),
    ({"d.csv": "text,label\na,x\nb,x\nc,x\n"}, ["--val-data", "d.csv"],
     "d.csv: a classifier needs at least two classes"),
    ({"d.csv": "text,label\na,x\nb,y\n", "v.csv": "text,label\na,x\nb,z\n"}, ["--val-data", "v.csv"],
     "v.csv: line 3: label 'z' does not occur in the training data (labels: x, y)"),
    ({"d.jsonl": '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"\n'}, [], "d.jsonl: line 2: malformed JSON"),
])
def test_bad_classification_data_is_one_line_naming_file_and_line(tmp_path, tokenizer, capsys, files, extra, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    extra = [str(tmp_path / a) if a in files else a for a in extra]
    data = str(tmp_path / next(iter(files)))
    assert main(["train", "--task", "classify", "--data", data, *extra, *SMALL, "--context-length", "32",
                 "--out-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"scratchgpt train: error: {tmp_path / message}") and err.count("\n") == 1, err


# --------------------------------------------------------------------------- instructions

INSTRUCT = ["--task", "instruct", *SMALL, "--context-length", "64", "--batch-size", "16", "--lr", "3e-3",
            "--warmup", "10"]


def write_instructions(folder, train_count: int) -> list[dict]:
    """Train records in folder/instructions.json; returns held-out ones (word triples not in training)."""
    records = instruction_records(train_count + 50)
    (folder / "instructions.json").write_text(json.dumps(records[:train_count]))
    (folder / "held-out.json").write_text(json.dumps(records[train_count:]))
    return records[train_count:]


TINY = ["--task", "instruct", "--n-layers", "2", "--emb-dim", "32", "--n-heads", "2", "--context-length", "64",
        "--batch-size", "4", "--lr", "3e-3", "--warmup", "2", "--eval-iters", "1", "--sample-tokens", "2",
        "--responses", "none", "--device", "cpu"]


def test_an_instruct_run_resumes_exactly_and_refuses_another_task(tmp_path, tokenizer, capsys):
    write_instructions(tmp_path, 100)
    common = ["train", "--data", str(tmp_path / "instructions.json"), *TINY, "--drop-rate", "0.1",
              "--max-steps", "4", "--eval-every", "2"]
    assert main([*common, "--out-dir", str(tmp_path / "straight")]) == 0
    assert main([*common, "--out-dir", str(tmp_path / "stopped"), "--max-minutes", "0"]) == 0  # stops after step 1
    assert safe_load(tmp_path / "stopped" / "last.pt")["step"] == 1
    assert main([*common, "--out-dir", str(tmp_path / "stopped"), "--resume"]) == 0
    straight, resumed = ([r for r in metrics(tmp_path / run) if "loss" in r or r["step"] in (2, 4)]
                         for run in ("straight", "stopped"))
    for record in straight + resumed:
        record.pop("tokens_per_s", None)
    assert straight == resumed and len(straight) == 4 + 2  # every step's loss, bitwise, with dropout on
    capsys.readouterr()
    assert main([*common, "--prompt-style", "phi3", "--out-dir", str(tmp_path / "stopped"), "--resume"]) == 1
    assert "cannot resume: " in capsys.readouterr().err  # trained with the alpaca prompt, not phi3


def test_bf16_fine_tuning_runs_on_cpu(tmp_path, tokenizer):
    write_instructions(tmp_path, 20)
    assert main(["train", "--data", str(tmp_path / "instructions.json"), *TINY, "--dtype", "bf16",
                 "--max-steps", "2", "--eval-every", "2", "--out-dir", str(tmp_path / "run")]) == 0
    last = metrics(tmp_path / "run")[-1]
    assert last["step"] == 2 and 0 < last["val_loss"] < 11


def train_instructions(folder, steps: int) -> list[dict]:
    """Fine-tune a small GPT from scratch on 1,200 instruction records (phi3 prompt, mask-prompt);
    returns the 50 held-out records it was validated on, and answered after training."""
    held_out = write_instructions(folder, 1200)
    assert main(["train", "--data", str(folder / "instructions.json"), "--val-data", str(folder / "held-out.json"),
                 *INSTRUCT, "--drop-rate", "0", "--prompt-style", "phi3", "--mask-prompt", "--max-steps", str(steps),
                 "--eval-every", str(steps), "--eval-iters", "2", "--sample-tokens", "12",
                 "--out-dir", str(folder / "run")]) == 0
    return held_out


def answers(folder) -> list[dict]:
    """The held-out records with the model's responses, as `train` wrote them beside the data."""
    return json.loads((folder / "instructions-with-response.json").read_text())


def stops_at_end_of_text(folder, records: list[dict], tokenizer, limit: int = 20) -> bool:
    """Whether the model ends every response with <|endoftext|> before `limit` tokens."""
    model = load_model_from_checkpoint(folder / "run" / "model.pth")
    for entry in records:
        prompt = tokenizer.encode_ordinary(format_prompt(entry, "phi3"))
        out = generate(model, torch.tensor([prompt]), limit, 64, eos_id=50256)
        if out.shape[1] - len(prompt) >= limit:
            return False
    return True


@pytest.fixture(scope="module")
def instructed(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("instruct")
    return folder, train_instructions(folder, FAST_STEPS)


def test_a_short_run_learns_the_answers_shape_and_to_stop(instructed, tokenizer):
    folder, held_out = instructed
    before, after = metrics(folder / "run")[0], metrics(folder / "run")[-1]
    assert before["val_loss"] > 10 and after["val_loss"] < FAST_VAL_LOSS, after
    responses = answers(folder)
    assert [{k: v for k, v in r.items() if k != "model_response"} for r in responses] == held_out
    assert all(len(r["model_response"].split()) == 3 for r in responses)  # three words, then end-of-text
    assert stops_at_end_of_text(folder, held_out[:10], tokenizer)


@pytest.mark.slow  # about 2 minutes on 2 quiet cores
def test_instruction_tuning_answers_held_out_records(tmp_path, tokenizer):
    held_out = train_instructions(tmp_path, FULL_STEPS)
    responses = answers(tmp_path)
    right = sum(r["model_response"] == r["output"] for r in responses)
    assert right >= 0.9 * len(held_out), [r for r in responses if r["model_response"] != r["output"]][:5]
    assert stops_at_end_of_text(tmp_path, held_out, tokenizer)


def test_generate_wraps_the_prompt_in_the_checkpoints_style_and_stops(instructed, tokenizer):
    folder, held_out = instructed
    entry = held_out[0]
    model = load_model_from_checkpoint(folder / "run" / "best.pt")
    expected = generate_response(model, tokenizer, entry, "phi3")
    result = run_cli("generate", "--checkpoint", str(folder / "run" / "best.pt"), "--device", "cpu",
                     entry["instruction"], "--input", entry["input"])
    assert result.stdout == expected + "\n"  # the response alone, ended by <|endoftext|>
    raw = run_cli("generate", "--checkpoint", str(folder / "run" / "best.pt"), "--device", "cpu",
                  "--prompt-style", "none", "--max-new-tokens", "3", "Hello")
    assert raw.stdout.startswith("Hello")  # plain continuation when asked


def test_chat_streams_an_answer_per_line_until_quit(instructed, tokenizer):
    folder, _ = instructed
    messages = ["Reverse the order of these words.", "Capitalize these words."]
    proc = subprocess.Popen([sys.executable, "-m", "scratchgpt.cli", "chat", "--checkpoint",
                             str(folder / "run" / "model.pth"), "--device", "cpu"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    out, err = proc.communicate("\n".join([messages[0], "", messages[1], "/quit", "never read"]) + "\n", timeout=300)
    assert proc.returncode == 0, err
    assert "prompt style phi3" in err
    model = load_model_from_checkpoint(folder / "run" / "model.pth")
    first, second = ("".join(stream_response(model, tokenizer, {"instruction": m}, "phi3")) for m in messages)
    assert out == f"> {first}\n> > {second}\n> "  # a "> " prompt per line read: the empty one gets no answer


def test_a_lora_classifier_trains_adapters_and_head_and_classifies_through_its_adapter(tmp_path, tokenizer, capsys):
    torch.manual_seed(0)
    base = GPTModel({"vocab_size": 50257, "context_length": 64, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
                     "drop_rate": 0.0, "qkv_bias": True})
    save_checkpoint(tmp_path / "base.pt", base)
    records = classification_records()
    write_csv(tmp_path / "d.csv", records[:30] + records[-30:])
    train = ["train", "--task", "classify", "--data", str(tmp_path / "d.csv"), "--init", str(tmp_path / "base.pt"),
             "--lora-rank", "4", "--context-length", "32", "--batch-size", "8", "--max-steps", "2",
             "--eval-every", "2", "--eval-iters", "1", "--device", "cpu", "--out-dir", str(tmp_path / "run")]
    assert main([*train, "--train-layers", "all"]) == 1
    assert "--train-layers chooses what trains without LoRA" in capsys.readouterr().err
    assert main(train) == 0
    adapter = safe_load(tmp_path / "run" / "adapter.pt")
    assert adapter["task"] == {"kind": "classify", "labels": ["docs", "license"]}
    assert adapter["trained_in_full"] == ["out_head.weight", "out_head.bias"]
    capsys.readouterr()
    text = records[0]["text"]
    assert main(["classify", "--checkpoint", str(tmp_path / "base.pt"), "--lora", str(tmp_path / "run" / "adapter.pt"),
                 "--device", "cpu", text]) == 0
    label, probability = capsys.readouterr().out.split()
    model = load_model_from_checkpoint(tmp_path / "base.pt")
    load_adapter(tmp_path / "run" / "adapter.pt", shape_for_task(model, adapter["task"]))
    expected = classify_probabilities([text], model, tokenizer)[0]
    assert label == ["docs", "license"][int(expected.argmax())]
    assert float(probability) == pytest.approx(float(expected.max()), abs=1e-4)
