"""The native decode step (`kernels.decoder`, csrc/decode_step.cpp): one call per step that computes
what the model's forward computes. Tested against that forward, through the layer kernels and as
plain PyTorch (the fast paths off), over ragged batches in every format; and left aside wherever it
would compute something other than the forward (LoRA layers, hooks, dropout, grad, many rows)."""

from __future__ import annotations

import pytest
import torch

from helpers import ops_run, plain_pytorch, sharp_model, trained_model
from scratchgpt import GPTModel, KVCache, generate, quantize_model, replace_linear_with_lora
from scratchgpt.kernels import DECODE_ROWS, NativeDecoder, decoder

pytestmark = pytest.mark.usefixtures("one_thread", "decode_kernels")

STEP_OP = "scratchgpt_cpu::decode_step"
FORMATS = {
    "fp32": lambda m: m,
    "bf16": lambda m: m.to(torch.bfloat16),
    "int8": quantize_model,  # fp32 activations
    "int8 bf16": lambda m: quantize_model(m.to(torch.bfloat16)),
}
SHAPES = {
    "tiny": {},
    # a head width (8) and widths (40, 160) that are not multiples of the 16-wide vectors, no qkv
    # biases, three layers
    "odd": {"emb_dim": 40, "n_heads": 5, "n_layers": 3, "qkv_bias": False},
}


def prefilled(model: torch.nn.Module, lengths: list[int], max_len: int) -> KVCache:
    """A cache whose row i holds a prompt of lengths[i] tokens, each prefilled alone (as a server does)."""
    cache = KVCache(model, len(lengths), max_len)
    with torch.no_grad():
        for row, length in enumerate(lengths):
            prompt = torch.randint(0, model.cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(row))
            model(prompt, cache=cache.rows(row, row + 1))
    return cache


def spread(logits: torch.Tensor) -> float:
    return (logits.float().max() - logits.float().min()).item()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lengths", [[7], [5, 16, 1], [3, 9, 4, 12, 8, 1, 6, 10]])
def test_native_steps_equal_the_models_forward(fmt, shape, lengths):
    """Six steps of a ragged batch through the native step, the model's forward with the layer
    kernels, and plain PyTorch: the same logits (fp32: to the last bits; bf16: within rounding steps
    of the model's format), the same cache contents and lengths."""
    model = FORMATS[fmt](sharp_model(**SHAPES[shape]))
    native, forward, plain = (prefilled(model, lengths, 32) for _ in range(3))
    step = decoder(model)
    assert isinstance(step, NativeDecoder)
    bf16 = model.tok_emb.weight.dtype == torch.bfloat16
    with torch.no_grad():
        for i in range(6):
            tokens = torch.randint(0, model.cfg.vocab_size, (len(lengths), 1),
                                   generator=torch.Generator().manual_seed(i))
            result = []
            used = ops_run(lambda: result.append(step(tokens, native)))
            assert STEP_OP in used and "scratchgpt_cpu::decode_matmul" not in used  # the whole step, one call
            got = result[0]
            want = model(tokens, cache=forward, logits_from=-1)
            with plain_pytorch():
                reference = model(tokens, cache=plain, logits_from=-1)
            assert got.dtype == want.dtype and got.shape == want.shape == (len(lengths), 1, model.cfg.vocab_size)
            assert native.lengths == forward.lengths == [n + i + 1 for n in lengths]
            # the same kernels: fp32 differs only where the layer norms and GELU round differently
            # (an ulp); bf16 where that moves a rounding (at most 0.41% of the spread over 96 such runs)
            assert (got.float() - want.float()).abs().max().item() <= (2 ** -7 if bf16 else 1e-5) * spread(want)
            assert (got.float() - reference.float()).abs().max().item() <= (0.01 if bf16 else 1e-4) * spread(reference)
        for mine, theirs in zip(native.keys + native.values, forward.keys + forward.values):
            bound = (2 ** -7 if bf16 else 1e-5) * theirs.float().abs().max().item()
            assert (mine.float() - theirs.float()).abs().max().item() <= bound


@pytest.mark.parametrize("fmt", FORMATS)
def test_generation_through_the_native_step_gives_the_plain_paths_tokens(fmt):
    """On the model trained in the tests, whose top logits stand apart: the greedy tokens of three
    prompts decoded together equal those of plain PyTorch, and every step was the native one."""
    model = FORMATS[fmt](trained_model())
    prompts = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(0))
    used = ops_run(lambda: generate(model, prompts, 2, 64))
    assert STEP_OP in used
    fast = generate(model, prompts, 24, 64)
    with plain_pytorch():
        plain = generate(model, prompts, 24, 64)
    assert torch.equal(fast, plain)


def test_a_view_of_some_rows_of_a_bigger_cache_is_stepped_in_place():
    """The server steps rows 0..hi-1 of its cache (`cache.rows`): the native step writes there and
    leaves the other rows alone."""
    model = sharp_model()
    big, alone = prefilled(model, [4, 6, 5], 16), prefilled(model, [4, 6], 16)
    before = [k[2].clone() for k in big.keys]
    tokens = torch.tensor([[3], [7]])
    with torch.no_grad():
        got = decoder(model)(tokens, big.rows(0, 2))
        want = model(tokens, cache=alone, logits_from=-1)
    assert (got - want).abs().max().item() <= 1e-5 * spread(want)
    assert big.lengths == [5, 7, 5]
    assert all(torch.equal(k[2], b) for k, b in zip(big.keys, before))


class Doubled(GPTModel):
    """A subclass: its forward is not the one the native step computes."""

    def forward(self, *args, **kwargs):
        return 2 * super().forward(*args, **kwargs)


def lora_model() -> GPTModel:
    model = sharp_model()
    replace_linear_with_lora(model, rank=2, alpha=4.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora.B"):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))  # a change to see
    return model.eval()


def hooked_model() -> GPTModel:
    model = sharp_model()
    model.trf_blocks[1].ff.layers[2].register_forward_hook(lambda module, args, out: -out)
    return model


def embedding_hooked_model() -> GPTModel:
    model = sharp_model()
    model.pos_emb.register_forward_hook(lambda module, args, out: 2 * out)
    return model


def dropout_hooked_model() -> GPTModel:
    model = sharp_model()
    model.trf_blocks[0].drop_shortcut.register_forward_pre_hook(lambda module, args: (args[0] * 0,))
    return model


def doubled_model() -> GPTModel:
    model = Doubled(sharp_model().cfg)
    model.load_state_dict(sharp_model().state_dict())
    return model.eval()


def dropout_model() -> GPTModel:
    return sharp_model(drop_rate=0.5).train()


@pytest.mark.parametrize("make", [lora_model, hooked_model, embedding_hooked_model, dropout_hooked_model,
                                  doubled_model, dropout_model])
def test_models_the_native_step_would_not_compute_keep_their_forward(make):
    model = make()
    assert not isinstance(decoder(model), NativeDecoder)
    tokens = torch.tensor([[1], [2]])

    def seeded(step) -> torch.Tensor:  # the same dropout masks for both, where there is dropout
        torch.manual_seed(0)
        return step(tokens, prefilled(model, [3, 5], 16))

    with torch.no_grad():
        want = seeded(lambda t, cache: model(t, cache=cache, logits_from=-1))
        result = []
        used = ops_run(lambda: result.append(seeded(decoder(model))))
    assert STEP_OP not in used
    assert torch.equal(result[0], want)


def test_steps_it_cannot_take_go_to_the_forward():
    """A prompt (several tokens per row), more than DECODE_ROWS rows, grad mode, and the fast paths
    switched off after the decoder was made: the model's forward, with its results."""
    model = sharp_model()
    step = decoder(model)

    def check(tokens: torch.Tensor, lengths: list[int]) -> None:
        mine, theirs = prefilled(model, lengths, 16), prefilled(model, lengths, 16)
        result = []
        used = ops_run(lambda: result.append(step(tokens, mine)))
        assert STEP_OP not in used
        assert torch.equal(result[0], model(tokens, cache=theirs, logits_from=-1))
        assert mine.lengths == theirs.lengths

    with torch.no_grad():
        check(torch.tensor([[1, 2, 3]]), [4])
        check(torch.ones(DECODE_ROWS + 1, 1, dtype=torch.long), [2] * (DECODE_ROWS + 1))
        with plain_pytorch():
            check(torch.tensor([[1]]), [4])
    check(torch.tensor([[1]]), [4])  # grad mode on


def test_bad_steps_are_clear_errors_that_change_nothing():
    model = sharp_model()
    step = decoder(model)
    cache = prefilled(model, [3, 16], 16)
    full = "16 cached \\+ 1 new tokens exceed the KV cache's 16 positions"
    with torch.no_grad(), pytest.raises(ValueError, match=full):
        step(torch.tensor([[1], [2]]), cache)
    cache = prefilled(model, [3, 4], 16)
    keys = [k.clone() for k in cache.keys]
    vocab = model.cfg.vocab_size
    outside = f"token id {vocab} is outside the model's vocabulary of {vocab}"
    with torch.no_grad(), pytest.raises(RuntimeError, match=outside):
        step(torch.tensor([[1], [vocab]]), cache)
    assert cache.lengths == [3, 4] and all(torch.equal(k, before) for k, before in zip(cache.keys, keys))
    with torch.no_grad(), pytest.raises(ValueError, match="3 rows of tokens for a KV cache of 2 rows"):
        step(torch.tensor([[1], [2], [3]]), cache)


def test_the_server_engine_decodes_through_the_native_step(tokenizer):
    from scratchgpt.serve.engine import Engine

    model = GPTModel({"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 1,
                      "drop_rate": 0.0, "qkv_bias": True}).eval()
    with Engine(model, tokenizer, max_batch=2) as engine:
        assert isinstance(engine.decode_step, NativeDecoder)


def test_an_int8_model_in_training_mode_keeps_the_forward_which_refuses_it():
    model = quantize_model(sharp_model()).train()
    step = decoder(model)
    assert not isinstance(step, NativeDecoder)
    with torch.no_grad(), pytest.raises(RuntimeError, match="int8-quantized layers are for inference only"):
        step(torch.tensor([[1]]), KVCache(model, 1, 8))


def test_the_operator_checks_every_layers_cache_before_writing(decode_kernels):
    """Memory safety where Python would not look: a layer whose cache holds fewer positions than the
    rows' lengths, a wrong head count, or a missing parameter is an error, not a write out of bounds."""
    from scratchgpt.kernels import _step_params

    model = sharp_model()
    cache = prefilled(model, [3, 5], 8)
    params = _step_params(model)
    keys, values = list(cache.keys), list(cache.values)
    keys[1] = keys[1][:, :, :5]  # room for positions 0..4 only: row 1 writes position 5

    def call(keys=cache.keys, params=params, heads=model.cfg.n_heads):
        return decode_kernels.decode_step(torch.tensor([1, 2]), cache.lengths, model.tok_emb.weight,
                                          model.pos_emb.weight, params, keys, values, heads, 1e-5)

    with torch.no_grad():
        with pytest.raises(RuntimeError, match="layer 1's cache must be"):
            call(keys=keys)
        with pytest.raises(RuntimeError, match="heads do not divide|cache must be"):
            call(heads=model.cfg.n_heads * 2)
        with pytest.raises(RuntimeError, match="parameter 0 \\(a layer norm's\\) must be"):
            call(params=[None] + params[1:])
        with pytest.raises(RuntimeError, match="parameter 2 \\(a weight\\) is missing"):
            call(params=params[:2] + [None] + params[3:])
        assert call().shape == (2, 1, model.cfg.vocab_size)


def tied_model() -> GPTModel:
    return sharp_model(tie_weights=True)


def classifier_model() -> GPTModel:
    """A classifier's shape (tasks/classify.py): the head replaced by one of 3 outputs."""
    from scratchgpt.kernels import Linear

    model = sharp_model()
    model.out_head = Linear(model.cfg.emb_dim, 3)
    return model.eval()


@pytest.mark.parametrize("make", [tied_model, classifier_model])
def test_other_heads_step_natively_with_the_forwards_logits(make):
    model = make()
    step = decoder(model)
    assert isinstance(step, NativeDecoder)
    mine, theirs = prefilled(model, [3, 5], 16), prefilled(model, [3, 5], 16)
    tokens = torch.tensor([[1], [2]])
    with torch.no_grad():
        got, want = step(tokens, mine), model(tokens, cache=theirs, logits_from=-1)
    assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-5 * spread(want)


def test_token_columns_of_any_layout_step_natively_and_bad_ones_get_the_forwards_errors():
    model = sharp_model()
    step = decoder(model)
    rows = torch.tensor([[5, 1], [6, 2]])
    for tokens in (rows[:, :1], rows[:, :1].int()):  # a strided column; int32 ids
        mine, theirs = prefilled(model, [3, 5], 16), prefilled(model, [3, 5], 16)
        with torch.no_grad():
            result = []
            assert STEP_OP in ops_run(lambda: result.append(step(tokens, mine)))
            want = model(tokens.contiguous(), cache=theirs, logits_from=-1)
            assert (result[0] - want).abs().max().item() <= 1e-5 * spread(want)
    cache = prefilled(model, [3, 5], 16)
    with torch.no_grad():
        with pytest.raises(TypeError, match="token ids must be an integer tensor"):
            step(torch.tensor([[1.0], [2.7]]), cache)
        with pytest.raises(ValueError, match="token ids must have shape"):
            step(torch.ones(2, 1, 1, dtype=torch.long), cache)
    assert cache.lengths == [3, 5]


def test_a_cache_made_in_inference_mode_is_refused_outside_it_as_the_forward_refuses_it():
    model = sharp_model()
    with torch.inference_mode():
        cache = prefilled(model, [3], 16)
        assert decoder(model)(torch.tensor([[1]]), cache).shape == (1, 1, model.cfg.vocab_size)  # inside: fine
    with torch.no_grad(), pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        decoder(model)(torch.tensor([[1]]), cache)


def test_a_bad_parameter_in_a_later_layer_leaves_the_cache_as_it_was(decode_kernels):
    from scratchgpt.kernels import _step_params

    model = sharp_model()
    cache = prefilled(model, [3, 5], 8)
    params = _step_params(model)
    params[22 + 2] = params[22 + 2][:, :-1]  # layer 1's query weight one column short
    keys = [k.clone() for k in cache.keys]
    with torch.no_grad(), pytest.raises(RuntimeError, match="parameter 24 must be a contiguous"):
        decode_kernels.decode_step(torch.tensor([1, 2]), cache.lengths, model.tok_emb.weight, model.pos_emb.weight,
                                   params, cache.keys, cache.values, model.cfg.n_heads, 1e-5)
    assert all(torch.equal(k, before) for k, before in zip(cache.keys, keys))


def test_two_threads_give_one_threads_results():
    """The products and the attention split their work across threads: a ragged batch of 8 on two
    threads equals the forward (whose kernels split the same way) and one thread."""
    model = sharp_model(emb_dim=64, n_heads=4)
    tokens = torch.randint(0, model.cfg.vocab_size, (8, 1), generator=torch.Generator().manual_seed(0))
    lengths = [3, 9, 4, 12, 8, 1, 6, 10]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            mine, theirs = prefilled(model, lengths, 16), prefilled(model, lengths, 16)
            with torch.no_grad():
                results.append((decoder(model)(tokens, mine), model(tokens, cache=theirs, logits_from=-1)))
    finally:
        torch.set_num_threads(threads)
    (one, want), (two, want_two) = results
    assert torch.equal(one, two)
    assert (two - want_two).abs().max().item() <= 1e-5 * spread(want_two)
