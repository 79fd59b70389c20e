"""Instruction fine-tuning pieces: the prompt, the dataset, the collate's targets, the loss, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_config
from scratchgpt import GPTModel
from scratchgpt.tasks.instruct import (
    InstructionDataset,
    InstructTask,
    custom_collate_fn,
    format_input,
    format_prompt,
    instruction_loss,
    load_instruction_data,
)
from scratchgpt.tasks.records import Records
from scratchgpt.train import calc_loss_batch

PAD = 50256


def walkthrough_collate(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None):
    """The walkthrough's custom_collate_fn, verbatim in substance: the reference for ours."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = item.copy()
        new_item += [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        mask = targets == pad_token_id
        indices = torch.nonzero(mask).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst), torch.stack(targets_lst)


def test_the_alpaca_prompt_is_the_walkthroughs_exactly():
    entry = {"instruction": "Identify the correct spelling of the following word.", "input": "Ocassion",
             "output": "The correct spelling is 'Occasion.'"}
    assert format_prompt(entry) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nIdentify the correct spelling of the following word.\n\n### Input:\nOcassion"
        "\n\n### Response:\n")
    assert format_input({**entry, "input": ""}).endswith("### Instruction:\nIdentify the correct spelling of "
                                                         "the following word.")  # no input section when empty
    assert format_prompt({"instruction": "Hi", "input": "x"}, "phi3") == "<|user|>\nHi\nx\n<|assistant|>\n"


def test_collate_matches_the_walkthroughs_example_and_keeps_the_first_end_of_text():
    batch = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
    inputs, targets = custom_collate_fn(batch)
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, PAD, PAD, PAD], [7, 8, 9, PAD, PAD]]
    assert targets.tolist() == [[1, 2, 3, 4, PAD], [6, PAD, -100, -100, -100], [8, 9, PAD, -100, -100]]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # and the walkthrough's own collate on random batches, truncated or not
        batch = [torch.randint(0, PAD, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen).tolist()
                 for _ in range(4)]
        for limit in (None, 5):
            ours, theirs = custom_collate_fn(batch, allowed_max_length=limit), walkthrough_collate(batch, allowed_max_length=limit)
            assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_mask_prompt_ignores_the_prompts_targets_only():
    batch = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
    _, targets = custom_collate_fn(batch, prompt_lengths=[3, 1, 2])
    assert targets.tolist() == [[-100, -100, 3, 4, PAD],  # predicting 1 and 2 (prompt) ignored; 3 is the response
                                [6, PAD, -100, -100, -100],  # a one-token prompt has no target inside it
                                [-100, 9, PAD, -100, -100]]


def test_dataset_encodes_prompt_then_output_in_each_records_style(tokenizer):
    data = [{"instruction": "Say hi.", "input": "", "output": "hi"},
            {"instruction": "Say hi.", "input": "<|endoftext|>", "output": "hi", "prompt_style": "phi3"}]
    dataset = InstructionDataset(data, tokenizer)
    first, second = dataset[0], dataset[1]
    assert tokenizer.decode(first) == format_prompt(data[0]) + "hi"
    assert tokenizer.decode(first[:dataset.prompt_lengths[0]]) == format_prompt(data[0])
    assert tokenizer.decode(second) == format_prompt(data[1], "phi3") + "hi"
    assert PAD not in second  # the text "<|endoftext|>" is text, not the end-of-text token


def test_padded_batch_loss_is_the_token_weighted_loss_of_each_example_alone():
    torch.manual_seed(0)
    model = GPTModel(tiny_config(vocab_size=PAD + 1, context_length=16)).eval()
    examples = [[5, 17, 300, 2, 9, 41], [7, 8], [100, 200, 300, 400]]
    for prompt_lengths in (None, [3, 1, 2]):
        inputs, targets = custom_collate_fn(examples, prompt_lengths=prompt_lengths)
        with torch.no_grad():
            batch_loss, count = instruction_loss(model, inputs, targets, "cpu")
            full_head = calc_loss_batch(inputs, targets, model, "cpu")  # every position's logits
            total, scored = 0.0, 0
            for i, example in enumerate(examples):  # alone, no padding at all
                alone_in, alone_t = custom_collate_fn([example], prompt_lengths=prompt_lengths and [prompt_lengths[i]])
                assert (alone_in != PAD).all()
                keep = alone_t[0] != -100
                logits = model(alone_in)[0]
                total += F.cross_entropy(logits[keep], alone_t[0][keep], reduction="sum").item()
                scored += int(keep.sum())
        assert count == scored
        assert batch_loss.item() == pytest.approx(total / scored, rel=1e-5)
        assert batch_loss.item() == pytest.approx(full_head.item(), rel=1e-5)


def records_file(tmp_path, text: str, name: str = "data.jsonl"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, name, message", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', "data.jsonl",
     "data.jsonl: line 2: missing field 'output'"),
    ('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": "b"\n', "data.jsonl",
     "data.jsonl: line 3: malformed JSON: "),
    ('[{"instruction": "a", "output": "b"}, {"instruction": " ", "output": "b"}]', "data.json",
     "data.json: record 2: empty 'instruction'"),
    ('[{"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}]', "data.json",
     "data.json: line 2: malformed JSON: "),
    ('["just text"]', "data.json", "data.json: record 1: a record must be a JSON object, got str"),
    ('{"instruction": "a", "output": "b", "prompt_style": "chatml"}', "data.jsonl",
     "data.jsonl: line 1: unknown prompt_style 'chatml'"),
    ('{"instruction": "a", "output": 3}', "data.jsonl", "data.jsonl: line 1: field 'output' must be a string"),
    ("instruction,output\nhi,\n", "data.csv", "data.csv: line 2: empty 'output'"),
    ("", "data.jsonl", "data.jsonl: holds no records"),
])
def test_bad_instruction_records_are_named_by_file_and_line(tmp_path, text, name, message):
    path = records_file(tmp_path, text, name)
    with pytest.raises(ValueError) as err:
        load_instruction_data(path)
    assert str(err.value).startswith(str(tmp_path / message)), err.value


def test_examples_longer_than_the_context_are_reported_or_refused(tmp_path, tokenizer):
    lines = [{"instruction": "Repeat.", "input": "", "output": "word " * n} for n in (3, 90, 4, 120)]
    path = records_file(tmp_path, "".join(json.dumps(r) + "\n" for r in lines))
    records = load_instruction_data(path)
    train, val = records.subset([0, 1, 2]), records.subset([3])
    length = [len(tokenizer.encode_ordinary(format_prompt(r) + r["output"])) for r in lines]
    assert length[0] <= 64 < length[1] and length[2] <= 64 < length[3]
    task = InstructTask(train, val, tokenizer, max_length=64)
    assert task.notes == [f"{path}: 1 of 3 records are longer than the context of 64 tokens (longest {length[1]}): "
                          "truncated to it",
                          f"{path}: 1 of 1 records are longer than the context of 64 tokens (longest {length[3]}): "
                          "truncated to it"]
    inputs, targets = task.train_batch(0, 0, 3)
    assert inputs.shape[1] == 64
    with pytest.raises(ValueError, match=rf"data.jsonl: 1 of 3 records are longer than the context of 64 tokens "
                                         rf"\(line 2: {length[1]} tokens\); shorten them"):
        InstructTask(train, val, tokenizer, max_length=64, on_long="refuse")


def test_the_task_batches_by_epoch_order_and_stores_its_prompt_style(tokenizer, tmp_path):
    records = Records(tmp_path / "x.json", [{"instruction": f"Count to {i}.", "output": str(i)} for i in range(10)],
                      [f"record {i + 1}" for i in range(10)])
    task = InstructTask(records, records.subset([0]), tokenizer, 64, prompt_style="phi3", mask_prompt=True)
    assert task.meta == {"kind": "instruct", "prompt_style": "phi3"}
    first, again = task.train_batch(3, 2, 4), task.train_batch(3, 2, 4)
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], task.train_batch(4, 2, 4)[0])
    assert ((first[1] != -100).sum(dim=1) == 2).all()  # mask-prompt: one digit and the end-of-text
    with pytest.raises(ValueError, match="unknown prompt style 'chatml'"):
        InstructTask(records, records, tokenizer, 64, prompt_style="chatml")


def test_a_batch_with_nothing_to_score_has_zero_loss_and_a_gradient():
    model = GPTModel(tiny_config(vocab_size=PAD + 1, context_length=16))
    inputs, targets = custom_collate_fn([[5, 6, 7], [8, 9]], prompt_lengths=[4, 3])  # all prompt
    loss, count = instruction_loss(model, inputs, targets, "cpu")
    assert count == 0 and loss.item() == 0.0
    loss.backward()
    assert model.tok_emb.weight.grad is not None
