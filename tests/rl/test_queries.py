"""mrrm.rl.queries: OpenRLHF's templated prompts and decoded queries back to (user message, media, response)."""
import pytest

from mrrm.model import tiny
from mrrm.rl.queries import QueryError, collapse_media_pads, response_of, strip_stop_texts, template_frame, user_turn

QWEN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def test_stop_texts_and_media_pads():
    assert strip_stop_texts("4<|im_end|><|endoftext|><|endoftext|>") == "4"
    assert strip_stop_texts("a </s> b") == "a </s> b"  # only at the end
    assert strip_stop_texts("x<eos>", ("<eos>",)) == "x"
    assert collapse_media_pads("a<|image_pad|><|image_pad|>b<|video_pad|><|video_pad|>") == "a<|image_pad|>b<|video_pad|>"


def test_response_of_whole_truncated_and_padded_queries():
    p = QWEN.format("<|vision_start|><|image_pad|><|vision_end|>Describe the picture, please.")
    assert response_of(p + "a cat<|im_end|>", p) == "a cat"
    expanded = p.replace("<|image_pad|>", "<|image_pad|>" * 64)
    assert response_of(expanded + "a cat<|im_end|>", p) == "a cat"
    for cut in (1, 30, len(p) - 20):  # left truncation anywhere
        assert response_of(p[cut:] + "a cat<|im_end|>", p) == "a cat"
    pads = expanded.index("<|image_pad|>")
    for cut in (pads, pads + 5 * len("<|image_pad|>")):  # at a token boundary inside the expanded pads
        assert response_of(expanded[cut:] + "a cat<|im_end|>", p) == "a cat"
    # a response that repeats the prompt's tail is still cut after the prompt, not inside the response
    assert response_of(p[40:] + "<|im_start|>assistant\nok", p) == "<|im_start|>assistant\nok"
    with pytest.raises(QueryError, match="neither starts with its prompt"):
        response_of("a cat<|im_end|>", p)
    with pytest.raises(QueryError, match="empty"):
        response_of("x", "")


@pytest.mark.parametrize("prompt,text,images,videos", [
    (QWEN.format("What is 2+2?"), "What is 2+2?", 0, 0),
    (QWEN.format("<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>Same?"),
     "Same?", 1, 1),
    ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n", "Hi", 0, 0),
    ("<bos><start_of_turn>user\n<image>What?<end_of_turn>\n<start_of_turn>model\n", "What?", 1, 0),
    ("<s>[INST] Hello there [/INST]", "Hello there", 0, 0),
    ("plain text prompt", "plain text prompt", 0, 0),
    (QWEN.format("first") + "ok<|im_end|>\n<|im_start|>user\nsecond<|im_end|>\n<|im_start|>assistant\n", "second", 0, 0),
])
def test_user_turn_known_templates(prompt, text, images, videos):
    turn = user_turn(prompt)
    assert (turn.text, turn.images, turn.videos) == (text, images, videos)


def test_policy_tokenizer_template_frame():
    """A template mrrm does not know: the policy tokenizer's own rendering gives the frame."""
    tok = tiny.build_tokenizer()
    tok.chat_template = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}### assistant:\n{% endif %}")
    frame = template_frame(tok)
    assert frame == ("### user:\n", "\n### assistant:\n")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Count the dots."}], tokenize=False,
                                     add_generation_prompt=True)
    assert user_turn(prompt, frame).text == "Count the dots."
    with pytest.raises(QueryError, match="--policy-tokenizer"):  # unknown without the frame: refused, never guessed
        user_turn(prompt)
    assert user_turn(prompt, prompt_format="plain").text == prompt.strip()
    tok.chat_template = None
    assert template_frame(tok) is None
