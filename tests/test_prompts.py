"""CoOp prompt tuning: open_clip's own text encoder at step 0, chunking changes nothing but memory."""

import pytest
import torch
import torch.nn.functional as F

from vlmcache.bench.prompts import prompt_step_memory
from vlmcache.errors import VlmcacheError
from vlmcache.prompts import CoOpHead
from vlmcache.train import evaluate_run, load_run, train_head
from vlmcache.train_config import TrainConfig

NAMES = ["red thing", "green thing", "blue thing", "a rather long class name of many words", "x"]


def _head(encoder, chunk, class_specific=False, ctx_init="a photo of a", n_ctx=4):
    dim = encoder.model.text_projection.shape[1]
    head = CoOpHead(dim, len(NAMES), n_ctx=n_ctx, ctx_init=ctx_init, class_specific=class_specific, class_chunk=chunk)
    head.bind_text(encoder.model, encoder.tokenizer, NAMES, 50.0)
    return head


@pytest.mark.parametrize("chunk", [0, 2])
def test_initial_prompts_are_open_clips_text_embeddings(tiny_encoder, chunk):
    head = _head(tiny_encoder, chunk)
    with torch.no_grad():
        ref = F.normalize(tiny_encoder.model.encode_text(tiny_encoder.tokenizer([f"a photo of a {c}." for c in NAMES])))
        assert torch.allclose(head.class_embeddings(), ref, atol=1e-5)
    assert torch.allclose(head.class_embeddings(), ref, atol=1e-5)  # with gradients on: the checkpointed path
    assert head.tokens.shape[1] < 77  # cut after the longest prompt's end token


@pytest.mark.parametrize("class_specific", [False, True])
def test_chunking_gives_the_same_logits_and_gradients(tiny_encoder, class_specific):
    torch.manual_seed(0)
    x, y = torch.randn(16, 32), torch.randint(len(NAMES), (16,))
    grads, logits = [], []
    for chunk in (0, 2, 3):
        torch.manual_seed(1)
        head = _head(tiny_encoder, chunk, class_specific, ctx_init="", n_ctx=3)
        out = head(x)
        F.cross_entropy(out, y).backward()
        logits.append(out.detach())
        grads.append(head.ctx.grad)
    assert grads[0].shape == ((len(NAMES), 3, 64) if class_specific else (3, 64))
    for g, lg in zip(grads[1:], logits[1:], strict=True):
        assert torch.allclose(lg, logits[0], atol=1e-5)
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-4 * float(grads[0].abs().max()))
    assert grads[0].abs().sum() > 0


def test_prompt_tuning_trains_only_the_context(digits_cache, tmp_path):
    cfg = TrainConfig(
        dataset="digits_lt",
        model="vlmcache-tiny",
        pretrained="none",
        cache_dir=str(digits_cache),
        runs_dir=str(tmp_path),
        device="cpu",
        head="coop",
        head_params={"n_ctx": "4", "ctx_init": "a photo of a", "class_chunk": "3", "class_specific": "true"},
        loss="balanced_softmax",
        epochs=4,
        lr=5e-2,
        batch_size=128,
    )
    result = train_head(cfg)
    assert result["history"][-1]["loss"] < 0.9 * result["history"][0]["loss"]
    _, model, saved = load_run(result["run"], torch.device("cpu"))
    assert list(saved["head_state"]) == ["ctx"]  # the frozen text tower is not copied into every run
    from vlmcache.encoders import load_encoder

    fresh = load_encoder("vlmcache-tiny", "none", "cpu").model.state_dict()
    tower = model.head._text[0]
    assert all(torch.equal(v, fresh[k]) for k, v in tower.state_dict().items())
    assert evaluate_run(result["run"])["metrics"] == result["metrics"]


def test_prompt_settings_are_checked(tiny_encoder, tmp_path):
    with pytest.raises(VlmcacheError, match="set n_ctx=4"):
        _head(tiny_encoder, 0, n_ctx=16)
    with pytest.raises(VlmcacheError, match="not coop"):
        TrainConfig(dataset=None, head="coop", stage2="lws", from_run=str(tmp_path)).resolve()


def test_chunked_prompt_memory_is_bounded_by_the_chunk_not_the_class_count():
    """One training step over 2,000 class prompts in a fresh process: chunked, the peak hardly moves from 250
    classes; all at once it is several times larger."""
    few = prompt_step_memory(model="vlmcache-tiny", classes=250, chunk=100)
    many = prompt_step_memory(model="vlmcache-tiny", classes=2000, chunk=100)
    whole = prompt_step_memory(model="vlmcache-tiny", classes=2000, chunk=0)
    assert many["step_mb"] - few["step_mb"] < 60, (few, many)
    assert whole["step_mb"] > 4 * many["step_mb"], (many, whole)
