"""The generic paths of RewardModel: text-only language models, and the padded path that serves
backbones mrrm cannot run packed (remote-code models such as Molmo2). Both must give the scores of
the packed Qwen-VL path / of a plain eager forward."""
import numpy as np
import pytest
import torch
from PIL import Image

from mrrm.model import tiny
from mrrm.model.parts import RewardModelConfig
from mrrm.model.reward_model import RewardModel

TOL = dict(rtol=1e-5, atol=2e-5)  # fp32, different attention kernels and summation orders

TEXT_SAMPLES = [
    {"prompt": "Hi", "responses": ["hello", "hey there x", "no"]},
    {"prompt": "What is two plus two?", "responses": ["four", "five"]},
    {"prompt": "One answer only", "responses": ["ok"]},
]


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


def _head_std(model, seed=1, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in (model.value_head[0], model.value_head[2]):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)
    return model


def _text_lm(tok, attn="sdpa"):
    from transformers import AutoModel, Qwen2Config

    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return AutoModel.from_config(cfg, attn_implementation=attn)


def _flat(x):
    return torch.tensor([v for row in x for v in row])


def test_text_lm_packed_equals_padded_and_eager(tok):
    packed = _head_std(RewardModel(_text_lm(tok), tok, None, RewardModelConfig(value_head_hidden_dim=32)).eval())
    padded = _head_std(RewardModel(_text_lm(tok), tok, None, RewardModelConfig(value_head_hidden_dim=32),
                                   packed=False).eval())
    assert packed.packed and not padded.packed
    for mode in ("joint", "single"):
        torch.testing.assert_close(_flat(packed.score(TEXT_SAMPLES, mode=mode)),
                                   _flat(padded.score(TEXT_SAMPLES, mode=mode)), **TOL)
    # eager, one sample at a time, positions computed by the model itself
    eager = _text_lm(tok, "eager").eval()
    got = packed.score(TEXT_SAMPLES)
    for i, s in enumerate(TEXT_SAMPLES):
        (inp,) = packed.micro_batches([packed.encoder.encode(s, i)], "joint", None)
        with torch.no_grad():
            h = eager(input_ids=inp.packed.input_ids[None]).last_hidden_state[0]
            ref = packed.value_head(h[inp.packed.score_positions]).squeeze(-1) * packed.head_scale
        torch.testing.assert_close(torch.tensor(got[i]), ref, **TOL)


def test_text_lm_independent_equals_single_and_padded_refuses_it(tok):
    packed = _head_std(RewardModel(_text_lm(tok), tok, None, RewardModelConfig(value_head_hidden_dim=32)).eval())
    torch.testing.assert_close(_flat(packed.score(TEXT_SAMPLES, mode="independent")),
                               _flat(packed.score(TEXT_SAMPLES, mode="single")), **TOL)
    joint, ind = packed.score(TEXT_SAMPLES[:1]), packed.score(TEXT_SAMPLES[:1], mode="independent")
    assert abs(joint[0][1] - ind[0][1]) > 1e-4  # response 2 sees response 1 only in joint mode
    padded = RewardModel(_text_lm(tok), tok, None, RewardModelConfig(value_head_hidden_dim=32), packed=False)
    with pytest.raises(ValueError, match="independent"):
        padded.score(TEXT_SAMPLES, mode="independent")


def test_text_only_backbone_rejects_media(tok):
    model = RewardModel(_text_lm(tok), tok, None, RewardModelConfig(value_head_hidden_dim=32))
    img = Image.new("RGB", (64, 64), "red")
    out = model.score([{"prompt": "What?", "image": img, "responses": ["red"]}, TEXT_SAMPLES[0]], errors="skip")
    assert out[0] is None and len(out[1]) == 3
    with pytest.raises(ValueError, match="sample 0.*text-only"):
        model.score([{"prompt": "What?", "image": img, "responses": ["red"]}])


def test_vl_padded_path_equals_packed(tok):
    cfg = tiny.build_config("qwen2_vl", tokenizer=tok)
    proc = tiny.build_processor("qwen2_vl", tok)
    torch.manual_seed(0)
    bb = tiny.build_backbone(cfg)
    packed = _head_std(RewardModel(bb, tok, proc, RewardModelConfig(value_head_hidden_dim=32)).eval())
    bb2 = tiny.build_backbone(cfg)
    bb2.load_state_dict(bb.state_dict())
    bb2.set_attn_implementation("sdpa")
    padded = _head_std(RewardModel(bb2, tok, proc, RewardModelConfig(value_head_hidden_dim=32), packed=False).eval())
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    samples = [{"prompt": "What is shown?", "image": img, "responses": ["a cat", "a dog", "a car"]}] + TEXT_SAMPLES
    for mode in ("joint", "single"):
        torch.testing.assert_close(_flat(packed.score(samples, mode=mode)), _flat(padded.score(samples, mode=mode)),
                                   **TOL)
