"""Stage 2 on cached features against references: scikit-learn, open_clip's zero-shot classifier, brute force."""

import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import long_tailed_features, write_feature_cache
from typer.testing import CliRunner

from vlmcache import cache, text_cache
from vlmcache.cli import app
from vlmcache.errors import VlmcacheError
from vlmcache.features import Tokens, load_inputs, open_split
from vlmcache.heads import CosineHead
from vlmcache.knn import knn
from vlmcache.samplers import build_sampler
from vlmcache.train import evaluate_run, load_run, train_head
from vlmcache.train_config import TrainConfig
from vlmcache.zeroshot import zero_shot

TAIL = [400, 200, 100, 50, 25, 12, 6, 3]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A long-tailed synthetic feature cache with a balanced test split, and tokens."""
    d = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    x, y = long_tailed_features(rng, TAIL, noise=1.1)
    xt, yt = long_tailed_features(np.random.default_rng(0), [60] * len(TAIL), noise=1.1)
    tokens = np.repeat(x[:, None, :], 3, axis=1) + rng.normal(scale=0.1, size=(len(x), 3, x.shape[1]))
    tokens_t = np.repeat(xt[:, None, :], 3, axis=1)
    write_feature_cache(d, "synth", {"train": (x, y, tokens), "test": (xt, yt, tokens_t)}, len(TAIL), shard_size=100)
    return d


def _cfg(cache_dir, tmp_path, **kw):
    base = dict(
        dataset="synth",
        model="synthetic",
        pretrained="random",
        cache_dir=str(cache_dir),
        runs_dir=str(tmp_path / "runs"),
        device="cpu",
        epochs=20,
        lr=1e-2,
        batch_size=64,
    )
    return TrainConfig(**{**base, **kw})


# --------------------------------------------------------------------------- samplers


def test_sampler_class_frequencies():
    labels = torch.from_numpy(np.concatenate([np.full(n, c) for c, n in enumerate([900, 100])]))
    gen = torch.Generator().manual_seed(0)
    inst = build_sampler("instance", labels).epoch(gen)
    assert sorted(inst.tolist()) == list(range(1000))  # every row once
    draws = torch.cat([build_sampler("class_balanced", labels).epoch(gen) for _ in range(20)])
    assert abs((labels[draws] == 1).float().mean().item() - 0.5) < 0.02
    draws = torch.cat([build_sampler("sqrt", labels).epoch(gen) for _ in range(20)])
    assert abs((labels[draws] == 1).float().mean().item() - 10 / 40) < 0.02  # sqrt(100) / (sqrt(900) + sqrt(100))
    with pytest.raises(VlmcacheError, match="Choose one of: instance, class_balanced, sqrt"):
        build_sampler("balanced", labels)


# --------------------------------------------------------------------------- references


def test_text_initialised_cosine_head_is_open_clips_zero_shot_classifier(digits_cache):
    model_dir = next((digits_cache / "digits_lt").iterdir())
    text = text_cache.read_text(model_dir / text_cache.TEXT_FILE)
    x = torch.from_numpy(cache.SplitCache(model_dir / "test").pooled().astype(np.float32))
    head = CosineHead(x.shape[1], 10)
    head.classifier.init_from_text(torch.from_numpy(text.sets["openai"][1]), text.logit_scale)

    from vlmcache.encoders import load_encoder

    # the same seeded random weights that wrote the cache; the classifier comes from open_clip itself
    enc = load_encoder("vlmcache-tiny", "none", device="cpu")
    classifier = open_clip.build_zero_shot_classifier(
        enc.model,
        open_clip.get_tokenizer("vlmcache-tiny"),
        text.classnames,
        open_clip.OPENAI_IMAGENET_TEMPLATES,
        num_classes_per_batch=5,
        device="cpu",
    )  # (D, C)
    want = enc.model.logit_scale.exp() * F.normalize(x, dim=-1) @ classifier
    with torch.no_grad():
        got = head(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    result = zero_shot(str(digits_cache), "digits_lt", "vlmcache-tiny", "none", device="cpu")
    labels = cache.SplitCache(model_dir / "test").labels()
    assert result["metrics"]["overall"] == pytest.approx((want.argmax(1).numpy() == labels).mean())


def test_linear_head_reaches_scikit_learn_logistic_regression(digits_cache, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    model_dir = next((digits_cache / "digits_lt").iterdir())
    tr, te = cache.SplitCache(model_dir / "train"), cache.SplitCache(model_dir / "test")
    x, y = tr.pooled().astype(np.float32), tr.labels()
    xt, yt = te.pooled().astype(np.float32), te.labels()
    scaler = StandardScaler().fit(x)
    sk = LogisticRegression(C=1.0, max_iter=5000).fit(scaler.transform(x), y)
    sk_acc = (sk.predict(scaler.transform(xt)) == yt).mean()
    ours = train_head(
        TrainConfig(
            dataset="digits_lt",
            model="vlmcache-tiny",
            pretrained="none",
            cache_dir=str(digits_cache),
            runs_dir=str(tmp_path),
            device="cpu",
            epochs=100,
            lr=1e-2,
            batch_size=64,
            weight_decay=0.0,
            head_params={"normalize": "standardize"},
        )
    )
    assert sk_acc > 0.5
    assert abs(ours["metrics"]["overall"] - sk_acc) <= 0.05, (ours["metrics"]["overall"], sk_acc)


def test_a_balanced_loss_beats_ce_on_few_shot_classes(synthetic, tmp_path):
    ce = train_head(_cfg(synthetic, tmp_path, loss="ce"))["metrics"]
    bs = train_head(_cfg(synthetic, tmp_path, loss="balanced_softmax"))["metrics"]
    assert bs["few"] > ce["few"] + 0.1, (ce, bs)
    assert bs["overall"] > ce["overall"]


def test_knn_equals_brute_force_and_balanced_votes_help_the_tail(synthetic):
    model_dir = synthetic / "synth" / "synthetic__random__00000000"
    tr, te = cache.SplitCache(model_dir / "train"), cache.SplitCache(model_dir / "test")
    x = tr.pooled().astype(np.float32)
    q = te.pooled().astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    nn = np.argsort(-(q @ x.T), axis=1)[:, :5]
    votes = np.zeros((len(q), len(TAIL)))
    sims = np.take_along_axis(q @ x.T, nn, 1)
    for i in range(len(q)):
        for j, s in zip(nn[i], sims[i], strict=True):
            votes[i, tr.labels()[j]] += np.exp(s / 0.1)
    want = (votes.argmax(1) == te.labels()).mean()
    got = knn(str(synthetic), "synth", "synthetic", "random", k=5, temperature=0.1, device="cpu")
    assert got["metrics"]["overall"] == pytest.approx(want)
    bal = knn(str(synthetic), "synth", "synthetic", "random", k=5, temperature=0.1, balanced=True, device="cpu")
    assert bal["metrics"]["few"] > got["metrics"]["few"]
    # torch's exact search (the GPU index) is the brute force too, and says which index it is
    by_torch = knn(str(synthetic), "synth", "synthetic", "random", k=5, temperature=0.1, device="cpu", index="torch")
    assert by_torch["metrics"] == got["metrics"]
    assert got["index"].startswith("faiss") and by_torch["index"].startswith("torch")


def test_torch_index_returns_faiss_neighbours_across_chunks():
    from vlmcache.knn import TorchIndex, build_index

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:200] + rng.normal(scale=0.3, size=(200, 24)).astype(np.float32)
    faiss_index, _ = build_index(x, torch.device("cpu"), "faiss")
    want_s, want_i = faiss_index.search(q, 10)
    got_s, got_i = TorchIndex(x, torch.device("cpu"), chunk=700).search(q, 10)  # five chunks, a short last one
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- heads, stages, runs


def test_decoder_trains_on_cached_tokens(synthetic, tmp_path):
    result = train_head(
        _cfg(synthetic, tmp_path, head="decoder", epochs=8, lr=3e-3, head_params={"depth": 2, "heads": 4})
    )
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < 0.6 * losses[0]
    # with plain CE on this long tail, a linear head reaches about 0.29; chance is 1/8
    assert result["metrics"]["overall"] > 2 / len(TAIL) and result["metrics"]["many"] > 0.6


def test_streamed_tokens_visit_each_sampled_row_once(synthetic):
    split = cache.SplitCache(synthetic / "synth" / "synthetic__random__00000000" / "train")
    stream = Tokens(split, torch.device("cpu"), in_memory=False, block_rows=16, window_blocks=3)
    memory = Tokens(split, torch.device("cpu"), in_memory=True)
    gen = torch.Generator().manual_seed(0)
    idx = build_sampler("class_balanced", stream.y).epoch(gen)
    xs, ys = zip(*stream.batches(idx, 50, torch.Generator().manual_seed(1)), strict=True)
    assert all(len(y) == 50 for y in ys[:-1])
    got = torch.cat(xs).flatten(1).numpy()
    want = memory.data[idx].flatten(1).numpy()
    order = lambda a: np.lexsort(a[:, :4].T)  # noqa: E731
    np.testing.assert_array_equal(got[order(got)], want[order(want)])
    np.testing.assert_array_equal(np.sort(torch.cat(ys).numpy()), np.sort(memory.y[idx].numpy()))


def test_input_statistics_are_float64_over_chunks_of_the_float16_features(synthetic):
    """The standardisation's mean and std (Bessel) from the float16 cache in chunks equal numpy's float64 ones;
    training and evaluation see each row upcast as the whole split would be."""
    from vlmcache.heads import build_head

    split = cache.SplitCache(synthetic / "synth" / "synthetic__random__00000000" / "train")
    data = load_inputs(split, "linear", torch.device("cpu"), stream=False)
    assert data.x.dtype == torch.float16
    x = split.pooled().astype(np.float64)
    head = build_head("linear", data.dim, len(TAIL), normalize="standardize")
    head.fit_input(x for x, _ in data.chunks(size=37))
    np.testing.assert_allclose(head.shift.numpy(), x.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(head.scale.numpy(), x.std(0, ddof=1), rtol=1e-6)
    j = torch.tensor([5, 0, 311])
    (xb, _), *_ = data.batches(j, 3)
    assert xb.dtype == torch.float32 and torch.equal(xb, torch.from_numpy(x[j.numpy()]).float())


@pytest.mark.parametrize(
    ("sampler", "batch_size"),
    [("class_balanced", 7), ("class_balanced", 50), ("class_balanced", 400), ("instance", 50)],
)
def test_streamed_token_batches_follow_the_documented_order(synthetic, sampler, batch_size):
    """The order streaming gives, written out plainly on the rows in memory: blocks in the epoch's order, windows
    of window_blocks blocks, each window's sampled rows (block by block, in sampled order) permuted by the
    epoch's numpy generator, the windows laid end to end and cut into minibatches. Pins the row order (and so
    every streamed run's numbers) across changes to how the blocks are read and copied; the instance sampler
    takes every row of a block once (copied from the block as it is), class-balanced sampling some rows twice."""
    from vlmcache.features import block_order

    split = cache.SplitCache(synthetic / "synth" / "synthetic__random__00000000" / "train")
    stream = Tokens(split, torch.device("cpu"), in_memory=False, block_rows=16, window_blocks=3)
    stream.set_epoch(0, 4)
    memory = Tokens(split, torch.device("cpu"), in_memory=True)
    idx = build_sampler(sampler, stream.y).epoch(torch.Generator().manual_seed(0))
    read, real_get = [], stream.blocks.get
    stream.blocks.get = lambda b, out=None: read.append(b) or real_get(b, out)
    got = list(stream.batches(idx, batch_size, torch.Generator().manual_seed(1)))

    rng = np.random.default_rng(int(torch.randint(2**31 - 1, (1,), generator=torch.Generator().manual_seed(1))))
    i = idx.numpy()
    order = [b for b in block_order(-(-len(split) // 16), 4) if (i // 16 == b).any()]
    rows = []
    for w in range(0, len(order), 3):
        sel = np.concatenate([i[i // 16 == b] for b in order[w : w + 3]])
        rows.append(sel[rng.permutation(len(sel))])
    rows = np.concatenate(rows)
    assert read == [b for w in range(0, len(order), 3) for b in sorted(order[w : w + 3])]  # each window in file order
    assert [len(y) for _, y in got] == [len(rows[k : k + batch_size]) for k in range(0, len(rows), batch_size)]
    torch.testing.assert_close(torch.cat([x for x, _ in got]), memory.data[rows], rtol=0, atol=0)
    assert torch.equal(torch.cat([y for _, y in got]), memory.y[rows])


def test_a_stream_closed_mid_epoch_stops_its_threads_and_a_failed_read_reaches_the_trainer(synthetic, monkeypatch):
    """An iteration budget that ends mid-epoch closes the batches early: the window and block threads stop
    (before, the window thread stayed blocked on its full queue, holding its windows). A block read that fails
    in the block thread is raised where the batches are taken."""
    import threading

    split = cache.SplitCache(synthetic / "synth" / "synthetic__random__00000000" / "train")
    stream = Tokens(split, torch.device("cpu"), in_memory=False, block_rows=16, window_blocks=2)
    idx = build_sampler("instance", stream.y).epoch(torch.Generator().manual_seed(0))
    before = set(threading.enumerate())
    batches = stream.batches(idx, 8, torch.Generator().manual_seed(1))
    next(batches)
    batches.close()
    assert set(threading.enumerate()) == before

    def broken(start, stop, name="tokens", out=None):
        raise OSError(f"cannot read rows {start}:{stop}")

    monkeypatch.setattr(split, "read_tokens", broken)
    with pytest.raises(OSError, match="cannot read rows"):
        list(stream.batches(idx, 8, torch.Generator().manual_seed(1)))
    assert set(threading.enumerate()) == before


@pytest.mark.parametrize("stage2", ["crt", "lws", "disalign", "marc"])
def test_second_stages_train_only_what_they_must(synthetic, tmp_path, stage2):
    first = train_head(_cfg(synthetic, tmp_path, head="decoder", epochs=2, head_params={"depth": 1}))
    _, first_model, _ = load_run(first["run"], torch.device("cpu"))
    second = train_head(
        TrainConfig(
            dataset=None,
            stage2=stage2,
            from_run=first["run"],
            cache_dir=str(synthetic),
            runs_dir=str(tmp_path / "runs"),
            device="cpu",
            epochs=3,
            lr=1e-2,
        )
    )
    cfg, model, saved = load_run(second["run"], torch.device("cpu"))
    assert cfg.loss == {"crt": "ce", "lws": "ce", "disalign": "grw", "marc": "grw"}[stage2]
    before = first_model.head.state_dict()
    after = model.head.state_dict()
    for name, value in before.items():
        if stage2 == "crt" and name.startswith("classifier."):
            continue
        torch.testing.assert_close(after[name], value, msg=name)  # the decoder is untouched
    clf_before = first_model.head.classifier.weight
    if stage2 == "crt":
        assert not torch.allclose(model.stage2.classifier.weight, clf_before)
    else:
        torch.testing.assert_close(model.stage2.classifier.weight, clf_before)
        trained = {n for n, p in model.stage2.named_parameters() if not n.startswith("classifier.")}
        assert trained and all(
            not torch.equal(p, torch.ones_like(p)) and not torch.equal(p, torch.zeros_like(p))
            for n, p in model.stage2.named_parameters()
            if n in trained and p.numel() > 1
        )


def test_same_seed_same_result_and_eval_reproduces_it(synthetic, tmp_path):
    a = train_head(_cfg(synthetic, tmp_path / "a", loss="focal", sampler="sqrt", epochs=3))
    b = train_head(_cfg(synthetic, tmp_path / "b", loss="focal", sampler="sqrt", epochs=3))
    c = train_head(_cfg(synthetic, tmp_path / "c", loss="focal", sampler="sqrt", epochs=3, seed=1))
    assert a["metrics"] == b["metrics"] and [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert [h["loss"] for h in a["history"]] != [h["loss"] for h in c["history"]]
    again = evaluate_run(a["run"], device="cpu")
    assert again["metrics"] == a["metrics"]
    adjusted = evaluate_run(a["run"], logit_adjust=1.0, device="cpu")
    assert adjusted["metrics"]["few"] >= a["metrics"]["few"]


def test_tau_normalisation_divides_each_class_weight_by_its_norm(synthetic, tmp_path):
    run = train_head(_cfg(synthetic, tmp_path, epochs=3))["run"]
    tuned = evaluate_run(run, tau_norm=1.0, device="cpu")
    _, model, _ = load_run(run, torch.device("cpu"))
    w = model.head.classifier.weight.detach()
    with torch.no_grad():  # the reference: unit-norm class weights, no bias (Kang et al. 2020, tau = 1)
        model.head.classifier.weight.copy_(w / w.norm(dim=1, keepdim=True))
        model.head.classifier.bias.zero_()
    test = load_inputs(open_split(next((synthetic / "synth").iterdir()), "test"), "linear", torch.device("cpu"), False)
    preds = model(test.x).argmax(1)
    assert tuned["metrics"]["overall"] == pytest.approx(float((preds == test.y).float().mean()))
    assert train_head(_cfg(synthetic, tmp_path / "t", epochs=3, tau_norm=1.0))["metrics"] == tuned["metrics"]
    with pytest.raises(VlmcacheError, match="--tau-norm applies to a first-stage linear classifier"):
        _cfg(synthetic, tmp_path, head="cosine", tau_norm=1.0).resolve()  # refused before any training
    cosine = train_head(_cfg(synthetic, tmp_path / "c", head="cosine", epochs=1))["run"]
    with pytest.raises(VlmcacheError, match="cosine and prompt classifiers are unit norm"):
        evaluate_run(cosine, tau_norm=1.0, device="cpu")


def test_run_folder_contents(synthetic, tmp_path):
    result = train_head(_cfg(synthetic, tmp_path, epochs=2))
    run = tmp_path / "runs" / result["run"].split("/")[-1]
    assert {p.name for p in run.iterdir()} == {"config.json", "metrics.json", "per_class.csv", "head.pt"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["metrics"]) >= {"overall", "many", "medium", "few", "top5", "mean_per_class"}
    assert metrics["cost"]["samples_per_s"] > 0 and metrics["cost"]["peak_rss_mb"] > 0
    import pandas as pd

    table = pd.read_csv(run / "per_class.csv")
    assert list(table["train_count"]) == TAIL and set(table["group"]) == {"many", "medium", "few"}
    with pytest.raises(VlmcacheError, match=r"exists already \(same settings"):
        train_head(_cfg(synthetic, tmp_path, epochs=2))
    with pytest.raises(VlmcacheError, match="exists already; pass --overwrite"):  # --out: any settings, no claim
        train_head(_cfg(synthetic, tmp_path, epochs=2, loss="focal", out=str(run)))


def test_a_nan_loss_stops_the_run_naming_epoch_and_step(synthetic, tmp_path):
    with pytest.raises(VlmcacheError, match=r"at epoch 1, step \d+; the run is stopped"):
        train_head(
            _cfg(synthetic, tmp_path, optimizer="sgd", lr=1e38, weight_decay=0.0, head_params={"normalize": "none"})
        )


def test_bad_stage2_input_is_clear(synthetic, tmp_path, digits_cache):
    with pytest.raises(VlmcacheError, match="--from RUN"):
        train_head(_cfg(synthetic, tmp_path, stage2="crt"))
    with pytest.raises(VlmcacheError, match="not a finished run"):
        train_head(_cfg(synthetic, tmp_path, stage2="crt", from_run=str(tmp_path)))
    with pytest.raises(VlmcacheError, match="Choose one of: crt, lws, disalign, marc"):
        train_head(_cfg(synthetic, tmp_path, stage2="cRT", from_run=str(tmp_path)))
    with pytest.raises(VlmcacheError, match="has no parameter 'depht'"):
        train_head(_cfg(synthetic, tmp_path, head="decoder", head_params={"depht": 2}))


# --------------------------------------------------------------------------- the CLI


def test_train_head_eval_zero_shot_knn_from_the_cli(synthetic, tmp_path):
    runner = CliRunner()
    common = ["-d", "places_lt", "--cache-dir", str(tmp_path / "nothing")]
    missing = runner.invoke(app, ["train-head", *common])
    assert missing.exit_code == 2 and "vlmcache extract --dataset places_lt" in missing.output

    (tmp_path / "c").mkdir()
    import shutil

    shutil.copytree(synthetic / "synth", tmp_path / "c" / "split")  # the CLI's dataset names are the registry's
    base = ["-d", "split", "-m", "synthetic", "-p", "random", "--cache-dir", str(tmp_path / "c"), "--device", "cpu"]
    result = runner.invoke(
        app,
        [
            "train-head",
            *base,
            "--loss",
            "ldam",
            "--head",
            "cosine",
            "--epochs",
            "3",
            "--loss-param",
            "scale=20",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)["run"]
    assert json.loads((tmp_path / "runs" / run.split("/")[-1] / "config.json").read_text())["config"][
        "loss_params"
    ] == {"scale": 20.0}
    ev = runner.invoke(app, ["eval", run, "--device", "cpu", "--json"])
    assert ev.exit_code == 0 and json.loads(ev.stdout)["metrics"] == json.loads(result.stdout)["metrics"]
    zs = runner.invoke(app, ["zero-shot", *base, "--templates", "photo", "--json"])
    assert zs.exit_code == 0 and 0 <= json.loads(zs.stdout)["metrics"]["overall"] <= 1
    bad = runner.invoke(app, ["zero-shot", *base, "--templates", "openai"])
    assert bad.exit_code == 2 and "template set" in bad.output
    kn = runner.invoke(app, ["knn", *base, "--k", "5", "--balanced", "--blend", run, "--json"])
    assert kn.exit_code == 0, kn.output
    assert json.loads(kn.stdout)["blend_run"] == run
    table = runner.invoke(app, ["train-head", *base, "--epochs", "1", "--runs-dir", str(tmp_path / "runs")])
    assert table.exit_code == 0 and "overall" in table.stdout and "samples/s" in table.stdout


def test_decoder_on_a_pooled_only_cache_says_how_to_extract_tokens(tmp_path):
    x, y = long_tailed_features(np.random.default_rng(0), [20, 5])
    write_feature_cache(tmp_path, "synth", {"train": (x, y, None), "test": (x, y, None)}, 2)
    with pytest.raises(VlmcacheError, match="holds pooled features only. Extract tokens: vlmcache extract .* --tokens"):
        train_head(_cfg(tmp_path, tmp_path, head="decoder"))
