"""model.py: rotary convention, grouped-query attention, the KV cache and sampling."""

import math

import pytest
import torch

import model
from model import ModelArgs, Transformer, apply_rope, model_args_from_preset, rope_tables, sample_next
from options import OptionError, UserError


def small_model(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    args = dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=97, max_seq_len=40)
    args.update(overrides)
    m = Transformer(ModelArgs(**args))
    m.eval()
    return m


def test_rope_rotates_consecutive_pairs_like_complex_multiplication():
    # llama2.c's checkpoints treat (x[2i], x[2i+1]) as one complex number; check against torch.complex.
    torch.manual_seed(0)
    B, T, H, hs = 2, 7, 3, 8
    x = torch.randn(B, T, H, hs)
    cos, sin = rope_tables(hs, T, 10000.0)
    got = apply_rope(x, cos, sin)
    xc = torch.view_as_complex(x.reshape(B, T, H, hs // 2, 2))
    freqs = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))  # (T, hs/2)
    want = torch.view_as_real(xc * freqs[None, :, None, :]).flatten(-2)
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
    # Position p, pair i turns by p * theta^(-2i/hs).
    assert math.isclose(float(torch.atan2(sin[3, 1], cos[3, 1])), 3 * 10000.0 ** (-2 / hs), rel_tol=1e-5)


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
    gqa = small_model(n_kv_heads=2)
    mha = small_model(n_kv_heads=6)
    sd = gqa.state_dict()
    hs = 48 // 6
    for i in range(2):
        for name in ("wk", "wv"):
            w = sd[f"layers.{i}.attention.{name}.weight"].view(2, hs, 48)
            # kv head j serves query heads 3j..3j+2.
            sd[f"layers.{i}.attention.{name}.weight"] = w.repeat_interleave(3, dim=0).reshape(6 * hs, 48)
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 15))
    a, _ = gqa(x)
    b, _ = mha(x)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("tie", [True, False])
def test_kv_cache_matches_full_forward(tie):
    m = small_model(tie_embeddings=tie)
    x = torch.randint(0, 97, (3, 30))
    full, _ = m(x)
    cache = m.new_cache(3)
    parts = [m(x[:, :11], cache=cache, start_pos=0)[0]]
    for t in range(11, 30):
        parts.append(m(x[:, t:t + 1], cache=cache, start_pos=t)[0])
    inc = torch.cat(parts, dim=1)
    assert torch.allclose(inc, full, atol=1e-5), (inc - full).abs().max()


def test_tied_classifier_is_the_embedding_and_untied_is_not():
    m = small_model(tie_embeddings=True)
    assert m.output.weight.data_ptr() == m.tok_embeddings.weight.data_ptr()
    u = small_model(tie_embeddings=False)
    assert u.output.weight.data_ptr() != u.tok_embeddings.weight.data_ptr()


def test_greedy_generate_matches_recomputing_from_scratch_and_stops_at_eos():
    m = small_model(seed=3)
    prompt = torch.randint(0, 97, (2, 4))
    out = m.generate(prompt, 25, temperature=0.0)
    ref = prompt
    for _ in range(25):
        logits, _ = m(ref)
        ref = torch.cat((ref, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, ref)
    eos = int(out[0, 6])  # make the 3rd generated token of row 0 the "EOS"
    stopped = m.generate(prompt[:1], 25, temperature=0.0, eos_id=eos)
    assert int(stopped[0, -1]) == eos and stopped.shape[1] <= 7
    # Never past the context length.
    long = m.generate(prompt[:1], 1000, temperature=1.0)
    assert long.shape[1] == m.params.max_seq_len


def test_sampling_filters():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, temperature=1.0, top_k=2, generator=g)) for _ in range(200)}
    assert picks == {1, 2}
    # top_p tiny keeps only the most likely token.
    picks = {int(sample_next(logits, temperature=1.0, top_p=0.01, generator=g)) for _ in range(50)}
    assert picks == {1}
    assert int(sample_next(logits, temperature=0.0)) == 1


def test_overfits_one_batch():
    torch.manual_seed(0)
    m = Transformer(model_args_from_preset("micro", vocab_size=64, max_seq_len=32))
    m.train()
    x = torch.randint(0, 64, (4, 33))
    opt = m.configure_optimizers(weight_decay=0.0, learning_rate=3e-3, betas=(0.9, 0.95), device_type="cpu")
    for _ in range(300):
        _, loss = m(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="n_heads"):
        ModelArgs(dim=48, n_heads=5).resolved()
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=48, n_heads=6, n_kv_heads=4).resolved()
    with pytest.raises(ValueError, match="unknown preset"):
        model_args_from_preset("nope")
    with pytest.raises(ValueError, match="max_seq_len"):
        small_model()(torch.zeros(1, 41, dtype=torch.long))


def test_preset_sizes():
    # llama2.c's stories15M shape with a 32000 vocab has 15.2M parameters; with our 5000 vocab, 7.4M.
    with torch.device("meta"):
        n = Transformer(model_args_from_preset("stories15M", vocab_size=32000)).num_params()
    assert abs(n - 15.19e6) < 0.05e6, n
    assert model_args_from_preset("stories15M").resolved().hidden_dim == 768
    assert model_args_from_preset("stories110M").resolved().hidden_dim == 2048


def test_cli_follows_the_error_contract(capsys):
    assert model.main(["--preset=nope"]) == 2  # a usage error
    err = capsys.readouterr().err
    assert err.startswith("model.py: error: --preset=nope: unknown preset 'nope'") and err.count("\n") == 1, err
    assert model.main(["--bogus"]) == 2 and "unknown option --bogus" in capsys.readouterr().err
    assert model.main(["--preset=micro"]) == 0 and capsys.readouterr().out.startswith("micro ")
    assert model.main(["--help"]) == 0 and "--preset=" in capsys.readouterr().out


def test_pick_device_is_the_one_device_choice():
    assert model.pick_device("cpu") == model.pick_device("cpu", local_rank=1) == "cpu"
    assert model.pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(OptionError, match=r"--device=tpu: must be auto, cpu, cuda, cuda:N or mps"):
        model.pick_device("tpu")
    if torch.cuda.is_available():
        assert model.pick_device("cuda", local_rank=0) == "cuda:0"
        with pytest.raises(UserError, match="no such GPU"):
            model.pick_device("cuda:999")
    else:
        with pytest.raises(UserError, match=r"--device=cuda:0: no CUDA GPU is available"):
            model.pick_device("cuda:0", local_rank=1)
