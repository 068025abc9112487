"""The shapes matrix: every command that evaluates, on caches of 2, 3, 4, 5 and 7 classes, with and without
--save-predictions, each number checked against a recomputation (from the saved predictions, or numpy).

Small class counts are where top-5 (k = min(5, C)), the predictions' schema and the shot groups have gone
wrong before. One module-scoped cache per class count, in the real on-disk format (conftest's
`write_feature_cache`): pooled features for the linear, cosine and zero-shot / kNN paths, and tokens for the
decoder. The coop head needs a real text tower and is covered in test_prompts.py.
"""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_feature_cache
from typer.testing import CliRunner

from vlmcache.cli import app

runner = CliRunner()
CLASS_COUNTS = (2, 3, 4, 5, 7)
TRAIN = [130, 60, 30, 12, 110, 5, 25]  # many (> 100), medium and few (< 20) at every class count from 2
TEST = 6  # test images per class
DIM, TOKENS, WIDTH = 16, 3, 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors of width 8 to 16: one intra-op thread is fastest, and far faster on a busy machine, where two
    threads wait for each other on every small op (the decoder's steps took 1 s each instead of 0.05 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=CLASS_COUNTS, ids=lambda c: f"{c}classes")
def shaped(request, tmp_path_factory):
    """(cache_dir, class count, train counts, test pooled, test labels) for one class count."""
    c = request.param
    d = tmp_path_factory.mktemp(f"shapes{c}")
    rng = np.random.default_rng(c)
    means = rng.normal(size=(c, DIM))

    def split(counts):
        y = np.concatenate([np.full(n, k) for k, n in enumerate(counts)]).astype(np.int64)
        x = (means[y] + rng.normal(scale=1.5, size=(len(y), DIM))).astype(np.float32)
        tokens = np.concatenate([x[:, None, :WIDTH], rng.normal(size=(len(y), TOKENS - 1, WIDTH))], 1)
        return x, y, tokens.astype(np.float32)

    counts = TRAIN[:c]
    train, test = split(counts), split([TEST] * c)
    write_feature_cache(d / "cache", "shapes", {"train": train, "test": test}, c)
    return d, c, np.asarray(counts), test[0], test[1]


def _invoke(*args: str) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _from_predictions(path, counts: np.ndarray, labels: np.ndarray) -> dict:
    """overall, many / medium / few (mean per-class accuracy, Liu et al.) and top-5 from a predictions file."""
    t = pq.read_table(path).to_pandas()
    np.testing.assert_array_equal(t["label"].to_numpy(), labels)
    k = min(5, len(counts))
    topk, scores = np.stack(t["topk"].to_numpy()), np.stack(t["topk_scores"].to_numpy())
    assert topk.shape == (len(labels), k) and scores.shape == (len(labels), k)
    np.testing.assert_array_equal(t["pred"].to_numpy(), topk[:, 0])
    assert (t["correct"].to_numpy() == (t["pred"].to_numpy() == labels)).all()
    return _recompute(t["pred"].to_numpy(), topk, scores, counts, labels)


def _recompute(pred, topk, scores, counts, labels) -> dict:
    acc = np.array([(pred[labels == c] == c).mean() for c in range(len(counts))])  # every class has test images
    out = {"overall": float((pred == labels).mean())}
    for name, sel in (("many", counts > 100), ("medium", (counts >= 20) & (counts <= 100)), ("few", counts < 20)):
        out[name] = float(acc[sel].mean()) if sel.any() else None
    hit = (topk == labels[:, None]) & np.isfinite(scores)  # a class scored -inf (kNN: no vote) is no hit
    out["top5"] = float(hit.any(1).mean()) if len(counts) > 5 else None
    return out


def _check(metrics: dict, expected: dict) -> None:
    for key, value in expected.items():
        if value is None:
            assert metrics[key] is None, key
        else:
            assert metrics[key] == pytest.approx(value, abs=1e-9), key


def _cache_args(d) -> list[str]:
    return ["--cache-dir", str(d / "cache"), "--dataset", "shapes", "--device", "cpu"]


@pytest.mark.parametrize("head", ["linear", "cosine", "decoder"])
def test_train_head_and_eval_at_every_class_count(shaped, head):
    d, c, counts, _, labels = shaped
    args = ["train-head", *_cache_args(d), "--head", head, "--epochs", "1", "-b", "64"]
    saved = _invoke(*args, "--runs-dir", str(d / "saved"), "--save-predictions")
    run = saved["run"]
    _check(saved["metrics"], _from_predictions(f"{run}/predictions.parquet", counts, labels))
    plain = _invoke(*args, "--runs-dir", str(d / "plain"))  # the same run without predictions: same numbers
    assert plain["metrics"] == saved["metrics"]
    again = _invoke("eval", run, "--device", "cpu")
    assert again["metrics"] == saved["metrics"]
    if head == "linear":  # eval writes its own predictions (over the run's, which it replaces)
        (d / "saved" / run.split("/")[-1] / "predictions.parquet").unlink()
        written = _invoke("eval", run, "--device", "cpu", "--save-predictions")
        _check(written["metrics"], _from_predictions(written["predictions"], counts, labels))


def test_zero_shot_at_every_class_count(shaped):
    from vlmcache import text_cache

    d, c, counts, x, labels = shaped
    text = text_cache.read_text(d / "cache" / "shapes" / "synthetic__random__00000000" / text_cache.TEXT_FILE)
    emb = text.sets["photo"][1]
    logits = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ emb.T  # the scale does not change the ranking
    order = np.argsort(-logits, axis=1, kind="stable")[:, : min(5, c)]
    expected = _recompute(order[:, 0], order, np.zeros(order.shape), counts, labels)
    out = _invoke("zero-shot", *_cache_args(d), "--templates", "photo")
    _check(out["metrics"], expected)
    path = d / f"zs{c}.parquet"
    saved = _invoke("zero-shot", *_cache_args(d), "--templates", "photo", "--save-predictions", str(path))
    assert saved["metrics"] == out["metrics"]
    _check(saved["metrics"], _from_predictions(path, counts, labels))


def test_knn_at_every_class_count(shaped):
    from vlmcache import cache

    d, c, counts, x, labels = shaped
    k, temperature = 3, 0.07
    train = cache.SplitCache(d / "cache" / "shapes" / "synthetic__random__00000000" / "train")
    xt, yt = train.load("pooled", np.float32), train.labels()
    xt /= np.linalg.norm(xt, axis=1, keepdims=True)
    q = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = q @ xt.T
    nn_ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(q), c))
    for i, ids in enumerate(nn_ids):  # each neighbour votes exp(cos / T) for its class
        np.add.at(votes[i], yt[ids], np.exp(sims[i, ids] / temperature))
    pred = votes.argmax(1)
    topk = np.argsort(-votes, axis=1, kind="stable")[:, : min(5, c)]
    scores = np.where(np.take_along_axis(votes, topk, 1) > 0, 0.0, -np.inf)
    expected = _recompute(pred, topk, scores, counts, labels)
    out = _invoke("knn", *_cache_args(d), "--k", str(k))
    _check(out["metrics"], expected)
    path = d / f"knn{c}.parquet"
    saved = _invoke("knn", *_cache_args(d), "--k", str(k), "--save-predictions", str(path))
    assert saved["metrics"] == out["metrics"]
    _check(saved["metrics"], _from_predictions(path, counts, labels))


def test_train_head_checks_it_can_save_predictions_before_it_trains(shaped, monkeypatch):
    """Predictions are written after training: a run that cannot write them fails first, not after the work."""
    import vlmcache.train as train
    from vlmcache.errors import VlmcacheError

    d, *_ = shaped

    def no_pyarrow():
        raise VlmcacheError("--save-predictions writes parquet, which needs pyarrow: pip install pyarrow.")

    def must_not_train(*a, **k):
        raise AssertionError("trained before checking")

    monkeypatch.setattr(train, "require_pyarrow", no_pyarrow)
    monkeypatch.setattr(train, "fit", must_not_train)
    args = ["train-head", *_cache_args(d), "--epochs", "1", "--runs-dir", str(d / "nopa"), "--save-predictions"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "pyarrow" in result.output and "Traceback" not in result.output
