"""Faithful to the authors' system: checkpoints their code wrote score in mrrm as in their code.

The fixtures under tests/fixtures/reference were produced by running the authors' code
(github yinuoyang01/multi-response-rm) on tiny random models with scripts/reference_fixtures.py:
the checkpoints exactly as their `save_checkpoint` wrote them (the peft adapter at the root), merged
models made with the calls their merge_lora.py makes, and golden.json: for every checkpoint and
sample, the token ids, response end / start indices and scores of THEIR collate + forward, one
sample per batch, fp32. Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Molmo2; text and image samples; N = 2..5;
responses ending in punctuation, newlines and spaces; every value-head type, activation and
response representation their code has. mrrm must give the same token ids and positions and the
same scores within 1e-5 (the issue asks 1e-4; measured: 3.1e-7 at most). The one stochastic step in
their code, the <|resp_sep|> row `resize_token_embeddings` draws around the embedding mean (which
the adapter checkpoints do not save), is taken at its expected value when the fixtures are made;
left random it moves their own scores by up to ~1e-4 from one load to the next.

The other direction: mrrm's `save_pretrained(..., layout="reference")` output was loaded and scored
by their code at generation time ("mrrm_saved:" entries).
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from model_fixtures import require_native

import mrrm
from mrrm.data.encoding import RESP_SEP
from mrrm.model.parts import text_hidden_size, unwrap
from mrrm.model.reward_model import RewardModel

ROOT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "reference")
GOLDEN = json.load(open(os.path.join(ROOT, "golden.json")))
SCORE_TOL = 1e-5


def samples():
    return [dict(s, image=os.path.join(ROOT, s["image"])) if "image" in s else dict(s) for s in GOLDEN["samples"]]


def base_of(entry):
    return os.path.join(ROOT, entry["base"]) if entry.get("base") else None


def load_checkpoint(name):
    """final_norm=True: these golden scores come from their code run under transformers 5.x, where the
    hidden state it reads is the normed one for every family (under their pinned 4.57.3 Qwen3-VL's is
    not: tests/model/test_reference_env.py)."""
    entry = GOLDEN["checkpoints"][name]
    return RewardModel.from_pretrained(os.path.join(ROOT, "checkpoints", name), base_model=base_of(entry),
                                       final_norm=True)


def assert_like_reference(model, entry, what):
    """Token ids, end and start positions exactly; scores within SCORE_TOL."""
    batch = samples()
    got = model.score(batch)
    for i, (s, want) in enumerate(zip(batch, entry["results"])):
        lay = model.encoder.encode(s, i).layout
        P = len(lay.prefix_ids)
        assert lay.prefix_ids + lay.joint_ids == want["input_ids"], f"{what}, sample {i}: token ids"
        assert [P + o for o in lay.joint_score_offsets] == want["resp_indices"], f"{what}, sample {i}: ends"
        assert [P + o for o in lay.joint_starts] == want["resp_start_indices"], f"{what}, sample {i}: starts"
        diff = max(abs(a - b) for a, b in zip(got[i], want["scores"]))
        assert diff <= SCORE_TOL, f"{what}, sample {i}: scores {got[i]} vs {want['scores']} (|diff| {diff:.2g})"
    return got


REFERENCE_CHECKPOINTS = [n for n in GOLDEN["checkpoints"] if not n.startswith("mrrm_saved:")]


def test_fixtures_cover_what_the_issue_asks():
    entries = [GOLDEN["checkpoints"][n] for n in REFERENCE_CHECKPOINTS]
    assert {e["family"] for e in entries} == {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "molmo2"}
    assert {e["kind"] for e in entries} == {"adapter", "merged"}
    configs = [json.load(open(os.path.join(ROOT, "checkpoints", n, "reward_model_config.json")))
               for n in REFERENCE_CHECKPOINTS]
    assert {c["value_head_type"] for c in configs} == {"linear", "mlp"}
    assert None in {c["value_head_hidden_dim"] for c in configs}
    assert {c["value_head_activation"] for c in configs} == {"selu", "gelu", "relu", "tanh", "silu"}
    assert {c["resp_repr_mode"] for c in configs} == {"last", "first", "first_last_concat", "first_last_add",
                                                      "first_last_sub", "response_mean"}
    sizes = {len(s["responses"]) for s in GOLDEN["samples"]}
    assert sizes == {2, 3, 4, 5}
    assert any("image" in s for s in GOLDEN["samples"]) and any("image" not in s for s in GOLDEN["samples"])
    # the adapter checkpoints are as the authors' save_checkpoint wrote them: adapter at the root
    for n in REFERENCE_CHECKPOINTS:
        files = set(os.listdir(os.path.join(ROOT, "checkpoints", n)))
        if GOLDEN["checkpoints"][n]["kind"] == "adapter":
            assert {"adapter_config.json", "adapter_model.safetensors", "value_head.pt", "reward_model_config.json",
                    "tokenizer_config.json", "optimizer.pt", "training_state.json"} <= files, n
        else:
            assert {"config.json", "model.safetensors", "value_head.pt", "reward_model_config.json"} <= files, n


@pytest.mark.parametrize("name", REFERENCE_CHECKPOINTS)
def test_reference_checkpoint_scores_like_the_authors_code(name):
    entry = GOLDEN["checkpoints"][name]
    require_native(entry["family"], lambda: load_checkpoint(name))
    model = load_checkpoint(name)
    cfg = json.load(open(os.path.join(ROOT, "checkpoints", name, "reward_model_config.json")))
    assert model.config.value_head_type == cfg["value_head_type"]
    assert model.config.value_head_activation == cfg["value_head_activation"]
    assert model.config.resp_repr_mode == cfg["resp_repr_mode"]
    assert not any("lora_" in n for n, _ in model.named_parameters())  # the adapter is merged
    assert model.packed
    got = assert_like_reference(model, entry, name)
    # non-vacuous: the responses of a sample score apart, well beyond the tolerance
    assert max(max(g) - min(g) for g in got) > 100 * SCORE_TOL
    # independent == single on the same checkpoint (every response alone, in one pass)
    batch = samples()
    ind, single = model.score(batch, mode="independent"), model.score(batch, mode="single")
    assert max(abs(a - b) for x, y in zip(ind, single) for a, b in zip(x, y)) <= 1e-5


def test_separator_row_follows_the_documented_rule():
    """The adapter checkpoints' tokenizer holds <|resp_sep|>, the base embedding lacks its row: it
    is appended as the mean of the base rows; every other row is the base's."""
    from transformers import AutoModelForImageTextToText

    name = "qwen2_vl_mlp_silu_last"
    model = load_checkpoint(name)
    base = AutoModelForImageTextToText.from_pretrained(base_of(GOLDEN["checkpoints"][name]))
    old = base.get_input_embeddings().weight
    emb = unwrap(model.backbone).get_input_embeddings().weight
    sep = model.tokenizer.convert_tokens_to_ids(RESP_SEP)
    assert sep == old.shape[0] and emb.shape[0] == old.shape[0] + 1 == len(model.tokenizer)
    torch.testing.assert_close(emb[sep], old.mean(0), rtol=0, atol=1e-7)
    torch.testing.assert_close(emb[:sep], old, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["mrrm", "reference"])
def test_molmo2_base_without_the_separator_row_saves_and_reloads(layout, tmp_path):
    """A Molmo2 base whose embedding lacks the <|resp_sep|> row and keeps its media tokens in the
    additional table (as the released Molmo2 does): the row is appended to the additional table
    (text_config.vocab_size stays the base vocabulary, as the authors' code grows `new_embedding`),
    so both layouts reload with the same scores. resize_token_embeddings alone overwrote vocab_size
    with the total, and the reload built vocab_size + additional_vocab_size rows (651 vs 661)."""
    from mrrm.model import tiny
    from mrrm.model.parts import RewardModelConfig, ensure_separator_token

    require_native("molmo2")
    tok = tiny.build_tokenizer(family="molmo2", with_separator=False)
    cfg = tiny.build_config("molmo2", tokenizer=tok, hidden_size=32, heads=2, kv_heads=1, vision_width=16)
    rows = len(tok)
    cfg.text_config.vocab_size, cfg.text_config.additional_vocab_size = rows - 10, 10
    torch.manual_seed(0)
    backbone = tiny.build_backbone(cfg)
    proc = tiny.build_processor("molmo2", tok)
    assert ensure_separator_token(proc.tokenizer, backbone)
    text = backbone.config.text_config
    assert (text.vocab_size, text.additional_vocab_size) == (rows - 10, 11)
    assert backbone.get_input_embeddings().weight.shape[0] == rows + 1
    model = RewardModel(backbone, proc.tokenizer, proc, RewardModelConfig(value_head_hidden_dim=8)).eval()
    with torch.no_grad():
        for p in model.value_head.parameters():
            p.normal_(0, 0.5)
    batch = samples()
    want = model.score(batch)
    model.save_pretrained(str(tmp_path / layout), layout=layout)
    got = mrrm.load(str(tmp_path / layout)).score(batch)
    assert max(abs(a - b) for x, y in zip(got, want) for a, b in zip(x, y)) <= 1e-6


def test_base_named_by_the_adapter_and_base_override(tmp_path):
    """Without base_model=, the base comes from adapter_config.json's base_model_name_or_path."""
    name = "qwen2_5_vl_mlp_silu_last"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(os.path.join(ROOT, "checkpoints", name), ckpt)
    cfg_path = ckpt / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = os.path.join(ROOT, "bases", "qwen2_5_vl")
    cfg_path.write_text(json.dumps(cfg))
    model = mrrm.load(str(ckpt))
    assert model.config.base_model == cfg["base_model_name_or_path"]
    assert_like_reference(model, GOLDEN["checkpoints"][name], "base from the adapter config")
    cfg["base_model_name_or_path"] = str(tmp_path / "nowhere")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(OSError):
        mrrm.load(str(ckpt))
    over = RewardModel.from_pretrained(str(ckpt), base_model=os.path.join(ROOT, "bases", "qwen2_5_vl"))
    assert_like_reference(over, GOLDEN["checkpoints"][name], "base_model= override")


def test_checkpoint_without_tokenizer_files_uses_the_base_tokenizer(tmp_path):
    """A checkpoint whose processor files are missing: the base's tokenizer (without <|resp_sep|>)
    gets the separator added as the authors' code adds it, the same id, the same scores."""
    name = "qwen2_vl_mlp_silu_last"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(os.path.join(ROOT, "checkpoints", name), ckpt)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
        (ckpt / f).unlink()
    model = RewardModel.from_pretrained(str(ckpt), base_model=os.path.join(ROOT, "bases", "qwen2_vl"))
    assert_like_reference(model, GOLDEN["checkpoints"][name], "tokenizer from the base")


# -- the other direction: what mrrm writes, the authors' code loads ---------------------------------

def _reference_files(path):
    return set(os.listdir(path))


@pytest.mark.parametrize("family", ["qwen2_vl", "molmo2"])
def test_save_reference_layout_merged(family, tmp_path):
    entry = GOLDEN["checkpoints"][f"mrrm_saved:{family}_merged"]
    require_native(family, lambda: RewardModel.from_pretrained(os.path.join(ROOT, entry["source"]),
                                                               base_model=base_of(entry)))
    model = RewardModel.from_pretrained(os.path.join(ROOT, entry["source"]), base_model=base_of(entry))
    out = tmp_path / "saved"
    model.save_pretrained(str(out), layout="reference")
    files = _reference_files(out)
    assert {"config.json", "model.safetensors", "value_head.pt", "reward_model_config.json",
            "tokenizer_config.json", "chat_template.jinja"} <= files
    assert not any(f.startswith("adapter") for f in files)
    cfg = json.loads((out / "reward_model_config.json").read_text())
    assert cfg == {"value_head_type": "mlp", "value_head_hidden_dim": 24, "value_head_activation": "silu",
                   "value_head_input_dim": text_hidden_size(model.backbone), "resp_repr_mode": "last"}
    state = torch.load(out / "value_head.pt", weights_only=True)
    assert sorted(state) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    # the authors' code scored these very files like the source (golden), and so does mrrm
    assert_like_reference(mrrm.load(str(out)), entry, f"{family} merged, reloaded")
    assert_like_reference(model, entry, f"{family} merged, in memory")


@pytest.mark.parametrize("family", ["qwen2_vl", "molmo2"])
def test_save_reference_layout_adapter(family, tmp_path):
    from safetensors import safe_open

    entry = GOLDEN["checkpoints"][f"mrrm_saved:{family}_adapter"]
    require_native(family, lambda: RewardModel.from_pretrained(os.path.join(ROOT, entry["source"]),
                                                               base_model=base_of(entry)))
    model = RewardModel.from_pretrained(os.path.join(ROOT, entry["source"]), base_model=base_of(entry))
    assert any("lora_" in n for n, _ in model.named_parameters())  # an mrrm LoRA model, unmerged
    assert_like_reference(model, entry, f"{family} mrrm LoRA in memory")
    out = tmp_path / "saved"
    model.save_pretrained(str(out), layout="reference")
    files = _reference_files(out)
    assert {"adapter_config.json", "adapter_model.safetensors", "value_head.pt", "reward_model_config.json",
            "tokenizer_config.json"} <= files and "config.json" not in files
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    # keys of a peft model around the ForConditionalGeneration class, as the authors' training wraps it
    assert keys and all(k.startswith("base_model.model.model.language_model.") for k in keys), keys[:3]
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == model.config.base_model
    reloaded = RewardModel.from_pretrained(str(out), base_model=base_of(entry))
    assert_like_reference(reloaded, entry, f"{family} adapter, reloaded")


def test_save_layout_argument_is_checked(tmp_path):
    model = load_checkpoint("qwen2_vl_merged")
    with pytest.raises(ValueError, match="layout must be"):
        model.save_pretrained(str(tmp_path / "x"), layout="published")


# -- bad checkpoints: an error naming the file and the field ---------------------------------------

def _copy(tmp_path, name="qwen2_vl_merged"):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(os.path.join(ROOT, "checkpoints", name), ckpt)
    return ckpt


def _edit_config(ckpt, **changes):
    p = ckpt / "reward_model_config.json"
    cfg = json.loads(p.read_text())
    for k, v in changes.items():
        if v is _DROP:
            cfg.pop(k)
        else:
            cfg[k] = v
    p.write_text(json.dumps(cfg))


_DROP = object()

BAD_CONFIGS = {
    "unknown field": (dict(value_head_dropout=0.1), r"unknown field\(s\) \['value_head_dropout'\]"),
    "bad head type": (dict(value_head_type="attention"), r"value_head_type must be one of"),
    "type mismatch": (dict(value_head_type="linear"), r"value_head_type is 'linear' but value_head.pt holds a mlp"),
    "bad activation": (dict(value_head_activation="swish"), r"value_head_activation must be one of"),
    "bad repr mode": (dict(resp_repr_mode="eos_token"), r"resp_repr_mode must be one of"),
    "hidden dim mismatch": (dict(value_head_hidden_dim=1024), r"value_head_hidden_dim=1024 .* has 24"),
    "hidden dim null but sized": (dict(value_head_hidden_dim=None), r"value_head_hidden_dim=None \(null = input size 32\)"),
    "input dim mismatch": (dict(value_head_input_dim=64), r"value_head_input_dim=64 but value_head.pt takes 32"),
    "concat needs 2H": (dict(resp_repr_mode="first_last_concat"), r"takes inputs of size 32.*gives 64"),
    "hidden dim not int": (dict(value_head_hidden_dim="1024"), r"value_head_hidden_dim must be a positive integer"),
}


@pytest.mark.parametrize("what", list(BAD_CONFIGS))
def test_bad_reference_config_is_an_error_naming_it(what, tmp_path):
    changes, problem = BAD_CONFIGS[what]
    ckpt = _copy(tmp_path)
    _edit_config(ckpt, **changes)
    with pytest.raises(ValueError, match=problem):
        mrrm.load(str(ckpt))


def test_missing_fields_take_the_authors_defaults(tmp_path):
    """An older reward_model_config.json without some keys: the authors' class defaults apply
    (selu, last); the head type comes from value_head.pt."""
    ckpt = _copy(tmp_path, "qwen2_vl_linear_default")
    _edit_config(ckpt, value_head_type=_DROP, value_head_activation=_DROP, resp_repr_mode=_DROP,
                 value_head_hidden_dim=_DROP, value_head_input_dim=_DROP)
    model = RewardModel.from_pretrained(str(ckpt), base_model=os.path.join(ROOT, "bases", "qwen2_vl"))
    assert (model.config.value_head_type, model.config.resp_repr_mode) == ("linear", "last")
    assert_like_reference(model, GOLDEN["checkpoints"]["qwen2_vl_linear_default"], "defaults")


def test_bad_checkpoint_files(tmp_path):
    ckpt = _copy(tmp_path)
    (ckpt / "reward_model_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="reward_model_config.json: not valid JSON"):
        mrrm.load(str(ckpt))
    ckpt = _copy(tmp_path / "b")
    (ckpt / "value_head.pt").write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match=r"value_head.pt: cannot be read"):
        mrrm.load(str(ckpt))
    ckpt = _copy(tmp_path / "c")
    torch.save({"weight": torch.zeros(1, 32)}, ckpt / "value_head.pt")
    with pytest.raises(ValueError, match=r"holds keys \['weight'\]"):
        mrrm.load(str(ckpt))
    ckpt = _copy(tmp_path / "d")
    (ckpt / "config.json").unlink()
    with pytest.raises(ValueError, match="neither a peft adapter"):
        mrrm.load(str(ckpt))
    ckpt = _copy(tmp_path / "e", "qwen2_vl_mlp_silu_last")
    (ckpt / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="without adapter weights"):
        RewardModel.from_pretrained(str(ckpt), base_model=os.path.join(ROOT, "bases", "qwen2_vl"))


def test_load_backbone_reads_every_weight_of_a_full_model_checkpoint(tmp_path):
    """A ForConditionalGeneration checkpoint (the Hub's names: model.layers.*, lm_head.weight) loads as
    the bare backbone with every weight from the file, as the full model's own load reads them
    (transformers 5.10 left the bare class's text weights at random init, with only a logged
    report: load_backbone goes through the full class there); a weight missing under every name is
    an error naming it, never a random weight."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    from mrrm.model.checkpoints import load_backbone

    base = os.path.join(ROOT, "bases", "qwen2_vl")
    got = load_backbone(base).state_dict()
    want = AutoModelForImageTextToText.from_pretrained(base).model.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    state = load_file(bad / "model.safetensors")
    dropped = next(k for k in state if "layers.1.mlp.up_proj" in k)
    del state[dropped]
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 backbone weights are not in the checkpoint.*layers\.1\.mlp\.up_proj"):
        load_backbone(str(bad))
