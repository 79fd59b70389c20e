"""The serving engine from Python, without HTTP: text streaming, batching, cancellation, queue, errors."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from helpers import one_thread, sharp_model
from scratchgpt import generate
from scratchgpt.serve import Engine, InvalidRequest, QueueFull, SamplingParams
from scratchgpt.serve.text import TextStream, token_text


# --------------------------------------------------------------------------- TextStream

def test_split_characters_are_released_whole(tokenizer):
    text = "日本語 café 🎉 done"
    ids = tokenizer.encode(text)
    partial = [t for t in ids if token_text(tokenizer, t).startswith("bytes:")]
    assert len(partial) >= 4  # GPT-2's BPE really splits these characters across tokens
    stream, pieces = TextStream(tokenizer), []
    for t in ids:
        pieces.append(stream.push(t, t).text)
    pieces.append(stream.finish().text)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # never half a character (it would decode as U+FFFD)
    assert pieces[ids.index(partial[0])] == ""  # the first byte of 日 alone releases nothing


def test_stop_strings_are_held_back_and_never_sent(tokenizer):
    ids = tokenizer.encode("The answer is 42. END of it")
    stream = TextStream(tokenizer, stop=["END", "42!"])
    pieces = []
    for t in ids:
        piece = stream.push(t, t)
        pieces.append(piece.text)
        if piece.stopped:
            break
    assert piece.stopped and "".join(pieces) == "The answer is 42. "
    assert pieces[3:] == [" ", "42.", " "]  # " 42" waited: it could have become "42!"

    # held-back text that does not become a stop string is released in the end
    stream = TextStream(tokenizer, stop=["ENDX"])
    text = "".join(stream.push(t, t).text for t in tokenizer.encode("ok END")) + stream.finish().text
    assert text == "ok END"


def test_a_stop_string_inside_a_token_cuts_that_token(tokenizer):
    ids = tokenizer.encode("Hello wonderful world")
    stream = TextStream(tokenizer, stop=["der"])
    released, text = [], ""
    for t in ids:
        piece = stream.push(t, t)
        text += piece.text
        released += piece.tokens
        if piece.stopped:
            break
    assert text == "Hello won"
    assert [payload for _, payload in released] == ids[:2]  # " wonderful" starts before the cut: kept
    assert [offset for offset, _ in released] == [0, 5]


# --------------------------------------------------------------------------- Engine

@pytest.fixture(scope="module")
def model():
    return sharp_model(seed=21, vocab_size=384, context_length=128)


def reference(model, prompt, max_tokens, **sampling):
    with one_thread():
        out = generate(model, torch.tensor([prompt]), max_tokens, model.cfg.context_length, eos_id=50256,
                       **sampling)
    return out[0, len(prompt):].tolist()


def test_sequences_batched_together_equal_each_alone(model, tokenizer):
    prompts = [[5, 17, 99], [3] * 11, [250], [7, 8, 9, 10, 11, 12, 13], [42, 43]]
    options = [dict(temperature=0.0), dict(temperature=0.9, seed=4), dict(temperature=1.1, top_k=20, seed=5),
               dict(temperature=0.8, top_p=0.9, seed=6), dict(temperature=0.0)]
    results = {}
    with Engine(model, tokenizer, max_batch=4, max_queue=4) as engine:  # 5 sequences: one waits for a slot
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, engine.complete(prompts[i], SamplingParams(max_tokens=40, **options[i])))) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        steps = engine.steps
    for i, prompt in enumerate(prompts):
        assert results[i].token_ids == reference(model, prompt, 40, **options[i])
        assert results[i].text == tokenizer.decode(results[i].token_ids)
        assert results[i].finish_reason == "length"
    assert steps < 5 * 39  # the sequences did share decode steps


def test_logprobs_are_the_models_log_softmax(model, tokenizer):
    prompt = [11, 22, 33, 44]
    with Engine(model, tokenizer) as engine:
        result = engine.complete(prompt, SamplingParams(max_tokens=8, temperature=0.0, logprobs=3,
                                                        prompt_logprobs=True))
    ids = prompt + result.token_ids
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0].log_softmax(-1)  # row t scores token t + 1
    scored = result.prompt[1:] + result.tokens
    assert result.prompt[0].logprob is None and [t.id for t in scored] == ids[1:]
    for t, info in enumerate(scored):
        assert info.logprob == pytest.approx(float(expected[t, info.id]), abs=1e-4)
        top = expected[t].topk(3)
        assert [i for i, _ in info.top_logprobs] == top.indices.tolist()
        assert [lp for _, lp in info.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_cancel_frees_the_slot_within_one_step_and_others_continue(model, tokenizer):
    with Engine(model, tokenizer, max_batch=2) as engine:
        seen = []

        def cancel_after_five(output):  # called on the engine's thread, in the middle of a decode step
            if len(output.request.token_ids) >= 5 and not seen:
                seen.append(len(output.request.token_ids))
                output.request.cancel()

        long = engine.submit([1, 2, 3], SamplingParams(max_tokens=120, temperature=0.0), cancel_after_five)
        other = engine.complete([9, 8], SamplingParams(max_tokens=60, temperature=0.7, seed=3))
        deadline = time.monotonic() + 30
        while not long.finished and time.monotonic() < deadline:
            time.sleep(0.001)
        assert long.finish_reason == "cancelled"
        assert len(long.token_ids) == seen[0]  # no step ran for it after the cancel
        assert long not in engine.slots and engine.num_running == 0
    assert other.token_ids == reference(model, [9, 8], 60, temperature=0.7, seed=3)
    delays = {labels["le"]: n for _, labels, n in engine.metrics.cancel_delay.samples() if "le" in labels}
    assert delays["0"] == delays["+Inf"] == 1


def test_a_full_queue_refuses_and_a_request_that_can_never_fit_is_invalid(model, tokenizer):
    with Engine(model, tokenizer, max_batch=1, max_queue=1) as engine:
        params = SamplingParams(max_tokens=100, temperature=0.0)
        first, second = engine.submit_many([([1], params, lambda o: None), ([2], params, lambda o: None)])
        with pytest.raises(QueueFull, match="queue of 1"):
            engine.submit([3], params, lambda o: None)
        with pytest.raises(InvalidRequest, match="3 sequences in one request exceed the server's 1 slots"):
            engine.submit_many([([1], params, lambda o: None)] * 3)
        with pytest.raises(InvalidRequest, match="prompt's 30 tokens plus max_tokens 100 exceed the model's "
                                                 "context of 128 tokens"):
            engine.submit([1] * 30, params, lambda o: None)
        with pytest.raises(InvalidRequest, match="token id 384 is outside the vocabulary of 384"):
            engine.submit([1, 384], params, lambda o: None)
        first.cancel()
        second.cancel()


def test_a_token_the_tokenizer_cannot_decode_fails_that_sequence_only(tokenizer):
    # A padded vocabulary (50304, as nanoGPT pads it) whose head prefers id 50300 from position 4 on.
    torch.manual_seed(0)
    model = sharp_model(seed=2, vocab_size=50304, context_length=32, emb_dim=16, n_heads=2, n_layers=1)
    with torch.no_grad():
        for p in model.trf_blocks.parameters():
            p.zero_()  # blocks add nothing: the logits depend on the position alone
        model.tok_emb.weight.zero_()
        model.pos_emb.weight.zero_()
        model.pos_emb.weight[:4, 0] = 1.0
        model.pos_emb.weight[4:, 1] = 1.0
        model.final_norm.scale.fill_(1.0)
        model.final_norm.shift.zero_()
        head = model.out_head.weight
        head.zero_()
        early, late = [model.final_norm(model.pos_emb.weight[i]) for i in (0, 4)]
        head[64] = early  # "a"
        head[50300] = late
    assert tokenizer.decode([64]) == "a"
    with Engine(model, tokenizer) as engine:
        outputs = list(engine.stream([64], SamplingParams(max_tokens=10, temperature=0.0)))
        assert "".join(o.text for o in outputs) == "aaaa"  # positions 0..3, then id 50300
        assert outputs[-1].finish_reason == "error"
        assert "token id 50300, which the tokenizer cannot decode" in outputs[-1].error
        assert engine.complete([64], SamplingParams(max_tokens=3, temperature=0.0)).text == "aaa"  # still serving


# --------------------------------------------------------------------------- chat templates

def test_a_checkpoints_instruction_style_is_its_chat_template():
    from scratchgpt.serve.chat import TRANSCRIPT, message_texts, template_for_task
    from scratchgpt.tasks.instruct import format_prompt

    messages = message_texts([{"role": "user", "content": [{"type": "text", "text": "Uppercase "},
                                                           {"type": "text", "text": "this: abc"}]}])
    alpaca = template_for_task({"kind": "instruct", "prompt_style": "alpaca"})
    assert alpaca.render(messages) == format_prompt({"instruction": "Uppercase this: abc"}, "alpaca")
    assert alpaca.render(messages).endswith("### Response:\n") and alpaca.stop == ()
    with pytest.raises(InvalidRequest, match=r"send one user message \(the instruction\), not the roles "
                                             r"\['system', 'user'\]"):
        alpaca.render([("system", "Be brief."), ("user", "Hi")])
    with pytest.raises(ValueError, match="unknown instruction prompt style 'klingon'"):
        template_for_task({"kind": "instruct", "prompt_style": "klingon"})
    assert template_for_task({}) is TRANSCRIPT and template_for_task({"kind": "classify"}) is TRANSCRIPT
    assert TRANSCRIPT.render([("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye")]) \
        == "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:"
