"""Each of the seed study's deviations from the method papers is a named switch; each switch against the formula it
implements (written from the papers and from the behaviour described in FIDELITY.md), and `--protocol seed`."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import long_tailed_features, write_feature_cache
from torch import nn

from vlmcache.errors import VlmcacheError
from vlmcache.heads import build_head
from vlmcache.loop import OnRawCosines, fit
from vlmcache.loop import epoch_steps as train_epoch_steps
from vlmcache.losses import build_loss
from vlmcache.lt_benchmarks import _package_file
from vlmcache.metrics import shot_groups
from vlmcache.recipe import PROTOCOLS, lr_factor, make_optimizer
from vlmcache.samplers import build_sampler
from vlmcache.splits import read_split_file
from vlmcache.stage2 import build_stage2
from vlmcache.train import evaluate_run, train_head
from vlmcache.train_config import TrainConfig

COUNTS = np.array([500, 120, 40, 9, 3])


def _batch(seed=0, n=64, c=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 3, torch.randint(0, c, (n,), generator=g)


# --------------------------------------------------------------------------- 3. re-weighting reduction


@pytest.mark.parametrize("name", ["cbw", "cb", "grw"])
def test_reweighting_reduction_mean_and_the_seeds_weighted_mean(name):
    logits, y = _batch()
    mean = build_loss(name, COUNTS)
    weighted = build_loss(name, COUNTS, reduction="weighted_mean")
    w = mean.weights
    per_sample = F.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(mean(logits, y), (w[y] * per_sample).mean())  # Cui et al.: mean of w_y * l
    assert torch.allclose(weighted(logits, y), (w[y] * per_sample).sum() / w[y].sum())
    # the seed's form is PyTorch's weighted cross-entropy (its weights differ by a constant, which cancels)
    assert torch.allclose(weighted(logits, y), F.cross_entropy(logits, y, weight=w))


# --------------------------------------------------------------------------- 4. LADE's regulariser


def _lade_by_hand(z, y, prior, weight=0.1, lam=0.1):
    """Hong et al. 2021: PC softmax CE + weight * -(sum_c p_c (E_c[z_c] - log mean_i exp(z_ic - log p_c - log C)
    - lam (.)^2)), on the logits z it is given."""
    n, c = z.shape
    pc = F.cross_entropy(z + prior.log(), y)
    bound = torch.zeros(c)
    for k in range(c):
        mine = z[y == k, k]
        first = mine.sum() / (len(mine) + 1e-8)
        second = torch.logsumexp(z[:, k] - prior[k].log() - math.log(c), 0) - math.log(n)
        bound[k] = first - second - lam * second**2
    return pc - weight * (bound * prior).sum()


def test_lade_regulariser_on_raw_logits_or_the_seeds_adjusted_logits():
    z, y = _batch(1)
    prior = torch.tensor(COUNTS / COUNTS.sum(), dtype=torch.float32)
    raw = build_loss("lade", COUNTS)(z, y)
    adjusted = build_loss("lade", COUNTS, regularizer_logits="adjusted")(z, y)
    assert torch.allclose(raw, _lade_by_hand(z, y, prior), atol=1e-5)
    # the seed: its PC term and its regulariser both see z + log p
    pc = F.cross_entropy(z + prior.log(), y)
    reg_on_adjusted = _lade_by_hand(z + prior.log(), y, prior) - F.cross_entropy(z + 2 * prior.log(), y)
    assert torch.allclose(adjusted, pc + reg_on_adjusted, atol=1e-5)
    assert not torch.allclose(raw, adjusted)


# --------------------------------------------------------------------------- 2. LDAM on a cosine head


def test_ldam_on_a_cosine_head_sees_margins_in_cosine_units():
    torch.manual_seed(0)
    head = build_head("cosine", 8, 5)  # its logits are (1 / 0.07) * cos
    x, y = torch.randn(32, 8), torch.randint(0, 5, (32,))
    loss = OnRawCosines(build_loss("ldam", COUNTS, max_margin=0.5, scale=30.0), head.classifier)
    cos = F.normalize(x, dim=-1) @ F.normalize(head.classifier.weight, dim=-1).T
    m = torch.tensor(COUNTS, dtype=torch.float64) ** -0.25
    m = (m * 0.5 / m.max()).float()
    expected = F.cross_entropy(30.0 * (cos - F.one_hot(y, 5) * m[y][:, None]), y)  # Cao et al. 2019
    assert torch.allclose(loss(head(x), y), expected, atol=1e-5)
    seed_form = build_loss("ldam", COUNTS, scale=1.0)  # the seed's CE(z - m) on linear logits
    z = torch.randn(32, 5)
    assert torch.allclose(seed_form(z, y), F.cross_entropy(z - F.one_hot(y, 5) * m[y][:, None], y), atol=1e-6)


# --------------------------------------------------------------------------- 1. the decoder's final norm


def test_decoder_final_norm_or_the_seeds_raw_class_token():
    torch.manual_seed(0)
    tokens = torch.randn(4, 3, 16)
    with_norm = build_head("decoder", 16, 5, depth=1)
    without = build_head("decoder", 16, 5, depth=1, final_norm=False)
    without.blocks.load_state_dict(with_norm.blocks.state_dict())
    last = with_norm.blocks(tokens)[:, 0]
    assert torch.allclose(without.features(tokens), last)
    assert torch.allclose(with_norm.features(tokens), F.layer_norm(last, (16,)), atol=1e-5)


# --------------------------------------------------------------------------- 5, 6. cRT and DisAlign


def test_crt_reinitialises_unless_told_to_keep_the_stage1_classifier():
    torch.manual_seed(0)
    classifier = nn.Linear(8, 5)
    kept = build_stage2("crt", classifier, reinit=False)
    fresh = build_stage2("crt", classifier)
    assert torch.equal(kept.classifier.weight, classifier.weight)
    assert not torch.equal(fresh.classifier.weight, classifier.weight)
    assert kept.classifier is not classifier and kept.classifier.weight.requires_grad  # a trained copy


def test_disalign_paper_start_is_the_stage1_logits_and_the_seed_form_is_its_own():
    torch.manual_seed(0)
    classifier = nn.Linear(8, 5)
    f = torch.randn(6, 8)
    z = classifier(f)
    paper = build_stage2("disalign", classifier)
    assert torch.allclose(paper(f), z)  # (1 - s) z + s (alpha z + beta) with g = 0, alpha = 1, beta = 0
    seed = build_stage2("disalign", classifier, init="seed")
    with torch.no_grad():
        seed.alpha.uniform_(0.5, 2)
        seed.beta.normal_()
    s = torch.sigmoid(seed.confidence(f))
    assert torch.allclose(seed(f), (1 + s * seed.alpha) * z + s * seed.beta)
    assert not torch.allclose(build_stage2("disalign", classifier, init="seed")(f), z)  # step 0 is not z


# --------------------------------------------------------------------------- 7. class-balanced sampling


def test_the_seeds_class_balanced_sampler_is_close_to_instance_sampling_on_places_lt():
    _, labels = read_split_file(_package_file("places_lt/Places_LT_train.txt.gz"))
    labels = torch.from_numpy(labels)
    groups = shot_groups(np.bincount(labels.numpy()), 100, 20)

    def shares(sampler) -> np.ndarray:
        drawn = sampler.epoch(torch.Generator().manual_seed(0)).numpy()
        g = groups[labels.numpy()[drawn]]
        return np.array([(g == k).mean() for k in ("many", "medium", "few")])

    seed = build_sampler("class_balanced", labels, replacement=False, num_samples=65536)
    assert len(seed.epoch(torch.Generator().manual_seed(0))) == 65536
    np.testing.assert_allclose(shares(seed), [0.824, 0.157, 0.019], atol=0.01)
    np.testing.assert_allclose(shares(build_sampler("instance", labels)), [0.844, 0.143, 0.013], atol=0.005)
    np.testing.assert_allclose(shares(build_sampler("class_balanced", labels)), [0.359, 0.446, 0.195], atol=0.01)
    # without replacement, every whole block of n draws visits every row once
    small = build_sampler("class_balanced", torch.tensor([0] * 8 + [1, 2]), replacement=False, num_samples=25)
    drawn = small.epoch(torch.Generator().manual_seed(1))
    assert sorted(drawn[:10].tolist()) == sorted(drawn[10:20].tolist()) == list(range(10))


# --------------------------------------------------------------------------- 8. the protocol


def test_protocol_seed_resolves_to_exactly_the_seeds_values_and_explicit_values_win():
    cfg = TrainConfig(dataset="x", protocol="seed", head="decoder", loss="grw").resolve()
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay) == ("sgd", 0.03, 0.9, True, 5e-4)
    assert (cfg.batch_size, cfg.iters, cfg.warmup_iters, cfg.schedule) == (256, 8192, 512, "seed_cosine")
    assert cfg.select_on == "val"
    assert cfg.loss_params == {"reduction": "weighted_mean"}
    assert cfg.head_params == {"final_norm": False, "init": "seed"}
    assert cfg.sampler_params == {"replacement": False, "num_samples": 65536}  # (8192 // 32) * 256
    assert (cfg.drop_last, cfg.eval_every) == (True, 256)
    lade = TrainConfig(dataset="x", protocol="seed", loss="lade").resolve()
    assert lade.loss_params == {"regularizer_logits": "adjusted"}
    assert TrainConfig(dataset="x", protocol="seed", loss="ldam").resolve().loss_params == {"scale": 1.0}
    crt = TrainConfig(dataset=None, protocol="seed", stage2="crt", from_run="r").resolve()
    assert crt.stage2_params == {"reinit": False} and crt.sampler == "class_balanced"
    assert TrainConfig(dataset=None, protocol="seed", stage2="disalign", from_run="r").resolve().stage2_params == {
        "init": "seed",
        "decay": True,
    }
    marc = TrainConfig(dataset=None, protocol="seed", stage2="marc", from_run="r").resolve()
    assert marc.stage2_params == {"decay": True}
    mine = TrainConfig(dataset="x", protocol="seed", lr=0.1, loss="grw", loss_params={"reduction": "mean"}).resolve()
    assert mine.lr == 0.1 and mine.loss_params == {"reduction": "mean"} and mine.optimizer == "sgd"
    default = TrainConfig(dataset="x").resolve()
    assert {k: getattr(default, k) for k in PROTOCOLS["default"]} == PROTOCOLS["default"]
    assert (default.drop_last, default.eval_every) == (False, 0)
    assert default.loss_params == {} and default.sampler_params == {}


def test_the_seeds_schedule_and_optimiser():
    f = lr_factor("seed_cosine", 8192, 512)
    assert f(0) == 0 and f(256) == 0.5 and f(512) == 1.0
    assert f(8192) == pytest.approx(math.cos(7 * math.pi / 16))  # about 0.195 of the peak at the end
    assert lr_factor("cosine", 100)(100) == pytest.approx(0.0)
    opt = make_optimizer(TrainConfig(dataset="x", protocol="seed").resolve(), [nn.Parameter(torch.ones(2, 2))])
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["nesterov"] and opt.param_groups[0]["lr"] == 0.03


# --------------------------------------------------------------------------- model selection and the budget


class _Data:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def batches(self, idx, batch_size, gen):
        for i in range(0, len(idx), batch_size):
            yield self.x[idx[i : i + batch_size]], self.y[idx[i : i + batch_size]]


def test_select_keeps_the_best_epoch_and_iters_is_a_step_budget():
    torch.manual_seed(0)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    module = nn.Linear(4, 3)
    cfg = TrainConfig(dataset="x", iters=10, batch_size=16, lr=0.1).resolve()  # 3 steps an epoch
    snapshots = {}
    scores = iter([0.5, 0.9, 0.3, 0.4])

    def select(epoch, step):
        snapshots[epoch] = {k: v.clone() for k, v in module.state_dict().items()}
        return next(scores)

    history, best = fit(
        module,
        _Data(x, y),
        nn.CrossEntropyLoss(),
        build_sampler("instance", y),
        cfg,
        torch.device("cpu"),
        select=select,
    )
    assert [h["step"] for h in history] == [3, 6, 9, 10]  # the last epoch stops at the budget
    assert best == {"epoch": 2, "step": 6, "score": 0.9}
    assert all(torch.equal(v, snapshots[2][k]) for k, v in module.state_dict().items())


def test_a_seed_protocol_run_records_every_value_and_its_selection(tmp_path):
    rng = np.random.default_rng(0)
    x, y = long_tailed_features(rng, [80, 30, 10])
    xv, yv = long_tailed_features(np.random.default_rng(1), [10, 10, 10])
    xt, yt = long_tailed_features(np.random.default_rng(2), [10, 10, 10])
    splits = {"train": (x, y, None), "val": (xv, yv, None), "test": (xt, yt, None)}
    write_feature_cache(tmp_path / "cache", "synth", splits, 3, shard_size=64)
    cfg = TrainConfig(
        dataset="synth",
        model="synthetic",
        pretrained="random",
        cache_dir=str(tmp_path / "cache"),
        runs_dir=str(tmp_path / "runs"),
        device="cpu",
        protocol="seed",
        loss="grw",
        iters=40,
        epochs=8,
        batch_size=16,
        warmup_iters=4,
        eval_every=10,
    )
    result = train_head(cfg, log=lambda *a: None)
    saved = json.loads((tmp_path / "runs" / result["run"].split("/")[-1] / "config.json").read_text())["config"]
    for key, value in {
        "protocol": "seed",
        "optimizer": "sgd",
        "lr": 0.03,
        "nesterov": True,
        "weight_decay": 5e-4,
        "batch_size": 16,
        "iters": 40,
        "epochs": 8,
        "warmup_iters": 4,
        "schedule": "seed_cosine",
        "select_on": "val",
        "drop_last": True,
        "eval_every": 10,
    }.items():
        assert saved[key] == value, key
    assert saved["loss_params"] == {"reduction": "weighted_mean"}
    assert saved["sampler_params"] == {"replacement": False, "num_samples": 80}  # (40 // 8) * 16
    history = result["history"]
    assert [h["step"] for h in history] == [5, 10, 15, 20, 25, 30, 35, 40]
    scored = {h["select_step"]: h["select_score"] for h in history if "select_score" in h}
    assert sorted(scored) == [10, 20, 30, 40]  # every 10 steps, not per epoch
    selection = result["selection"]
    assert selection["split"] == "val" and selection["score"] == max(scored.values())
    assert selection["step"] == min(s for s, v in scored.items() if v == selection["score"])
    assert evaluate_run(result["run"], device="cpu")["metrics"] == result["metrics"]  # the kept head is saved


def test_the_seeds_epoch_is_its_share_of_the_step_budget_in_whole_batches():
    """build.py `get_data_loader` (L127-129): (num_train_iter // epochs) * batch_size draws, drop_last; the
    issue's cases: --iters 2048 (64 steps an epoch, not 256), batch 512 (256 steps, not 128), batch 300 (no
    136-row batch)."""

    def resolved(**kw):
        return TrainConfig(dataset="x", protocol="seed", **kw).resolve()

    assert resolved(iters=2048).sampler_params["num_samples"] == 64 * 256
    assert resolved(batch_size=512).sampler_params["num_samples"] == 256 * 512
    cfg = resolved(batch_size=300)
    assert cfg.sampler_params["num_samples"] == 256 * 300 and cfg.drop_last
    assert train_epoch_steps(cfg.sampler_params["num_samples"], 300, True) == 256
    assert resolved(sampler_params={"num_samples": 1000}).sampler_params["num_samples"] == 1000  # explicit wins
    with pytest.raises(VlmcacheError, match=r"--iters \(1000\) must be a multiple of --epochs \(32\)"):
        resolved(iters=1000)
    # drop_last: the seed's DataLoader drops a partial batch; the papers' protocol trains it
    assert train_epoch_steps(650, 300, True) == 2 and train_epoch_steps(650, 300, False) == 3
    with pytest.raises(VlmcacheError, match="fewer than one batch"):
        train_epoch_steps(100, 300, True)


def test_eval_every_scores_every_n_steps_and_the_last_across_epochs():
    torch.manual_seed(0)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    module = nn.Linear(4, 3)
    # 3 steps an epoch (48 draws, batch 16), 12 steps in all, scored at 5, 10 and the last, 12
    cfg = TrainConfig(dataset="x", iters=12, batch_size=16, lr=0.1, eval_every=5, drop_last=True).resolve()
    seen = []
    scores = iter([0.2, 0.7, 0.5])

    def select(epoch, step):
        seen.append((epoch, step))
        return next(scores)

    sampler = build_sampler("instance", y, num_samples=48)
    history, best = fit(module, _Data(x, y), nn.CrossEntropyLoss(), sampler, cfg, torch.device("cpu"), select=select)
    assert seen == [(2, 5), (4, 10), (4, 12)]
    assert [h.get("select_step") for h in history] == [None, 5, None, 12]  # an epoch's last score
    assert best == {"epoch": 4, "step": 10, "score": 0.7}


def test_the_history_lr_is_the_one_the_epochs_last_step_used(monkeypatch):
    torch.manual_seed(0)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    module = nn.Linear(4, 3)
    cfg = TrainConfig(
        dataset="x", epochs=3, batch_size=16, lr=0.1, optimizer="sgd", schedule="seed_cosine", warmup_iters=2
    ).resolve()  # 3 steps an epoch, 9 in all
    used = []
    sgd_step = torch.optim.SGD.step

    def spy(self, *a, **k):  # the lr each optimiser step really applies
        used.append(self.param_groups[0]["lr"])
        return sgd_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    sampler = build_sampler("instance", y)
    history, _ = fit(module, _Data(x, y), nn.CrossEntropyLoss(), sampler, cfg, torch.device("cpu"))
    assert len(used) == 9
    assert [h["lr"] for h in history] == [used[2], used[5], used[8]]
    f = lr_factor("seed_cosine", 9, 2)
    assert history[0]["lr"] == 0.1 * f(2) and history[-1]["lr"] == 0.1 * f(8)


# --------------------------------------------------------------------------- 10. the seed's preprocessing


@pytest.fixture
def tiny224(monkeypatch):
    """vlmcache-tiny at 224 px, as the seed's crop needs."""
    import copy

    from open_clip import factory

    cfg = copy.deepcopy(factory._MODEL_CONFIGS["vlmcache-tiny"])
    cfg["vision_cfg"]["image_size"] = 224
    cfg["vision_cfg"]["patch_size"] = 32
    monkeypatch.setitem(factory._MODEL_CONFIGS, "tiny224", cfg)
    return "tiny224"


def test_seed_preprocessing_is_resize_256_center_crop_224_with_imagenet_statistics(tiny224, tmp_path):
    from PIL import Image
    from torchvision.transforms import functional as TF

    from vlmcache.encoders import load_encoder
    from vlmcache.features import find_cache

    model = load_encoder(tiny224, "none", device="cpu")
    seed = load_encoder(tiny224, "none", device="cpu", preprocess_mode="seed")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8))
    by_hand = TF.normalize(
        TF.to_tensor(TF.center_crop(TF.resize(img, 256, TF.InterpolationMode.BILINEAR), 224)),
        [0.485, 0.456, 0.406],
        [0.229, 0.224, 0.225],
    )
    assert torch.allclose(seed.preprocess(img), by_hand)
    assert not torch.allclose(model.preprocess(img), by_hand)
    assert seed.fingerprint["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    assert seed.key.startswith(f"{tiny224}__random+seedprep__") and seed.key != model.key
    for key in (seed.key, model.key):  # a folder with class texts is a cache to find
        (tmp_path / "d" / key).mkdir(parents=True)
        (tmp_path / "d" / key / "text.h5").touch()
    assert find_cache(tmp_path, "d", tiny224, "none", preprocess="seed").name == seed.key
    assert find_cache(tmp_path, "d", tiny224, "none").name == model.key
    with pytest.raises(Exception, match="crops 224 px images"):
        load_encoder("vlmcache-tiny", "none", device="cpu", preprocess_mode="seed")


def test_pipelines_take_the_new_parameter_mappings_as_grids_and_dry_run_names_the_points(tmp_path):
    from typer.testing import CliRunner

    from vlmcache.cli import app
    from vlmcache.pipeline import load_pipeline
    from vlmcache.planning import plan

    path = tmp_path / "p.yaml"
    path.write_text(
        "datasets: [digits_lt]\nmodels: [{model: vlmcache-tiny, pretrained: none}]\n"
        "defaults: {protocol: seed}\n"
        "methods:\n  - {name: a, loss: cbw, sampler_params: {replacement: [true, false], num_samples: 512}}\n"
    )
    runs = plan(load_pipeline(path))
    assert [r.config().resolve().sampler_params["replacement"] for r in runs] == [True, False]
    assert runs[0].config().resolve().loss_params == {"reduction": "weighted_mean"}  # the protocol's switch
    result = CliRunner().invoke(app, ["ablate", str(path), "--dry-run"])
    assert "a[sampler_params.replacement=True]" in result.output  # brackets are not taken for markup


# --------------------------------------------------------------------------- 11. the decoder's initialisation


def test_the_seeds_decoder_init_is_hf_init_weights_over_timm_blocks():
    """clip.py L26-33 builds timm Blocks and an nn.Linear inside a Hugging Face model: `_init_weights` zeroes every
    new Linear bias and leaves the weights at nn.Linear's default, kaiming-uniform with bound 1 / sqrt(fan_in)."""
    width, heads = 64, 4
    torch.manual_seed(0)
    seed = build_head("decoder", width, 5, heads=heads, init="seed")
    torch.manual_seed(0)
    torch_init = build_head("decoder", width, 5, heads=heads)
    bound = width**-0.5  # qkv, proj and fc1 have fan-in W; fc2 fan-in W * mlp_ratio
    for block in seed.blocks.layers:
        attn = block.self_attn
        for bias in (attn.in_proj_bias, attn.out_proj.bias, block.linear1.bias, block.linear2.bias):
            assert torch.count_nonzero(bias) == 0
        w = attn.in_proj_weight
        assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)  # uniform(-b, b)
        assert block.linear2.weight.abs().max() <= block.linear2.in_features**-0.5
    assert torch.count_nonzero(seed.classifier.bias) == 0
    # row 11: timm 0.5.4's Block takes nn.LayerNorm's default eps, 1e-5, as PyTorch's layer does
    assert {m.eps for m in seed.modules() if isinstance(m, nn.LayerNorm)} == {1e-5}
    first, second = seed.blocks.layers[0], seed.blocks.layers[1]
    for name in ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"):
        assert not torch.equal(first.get_parameter(name), second.get_parameter(name))  # drawn block by block
    # PyTorch's own start (the default): qkv xavier-uniform, sqrt(6 / 4W) = 1.22 / sqrt(W); biases non-zero
    layer = torch_init.blocks.layers[0]
    assert layer.self_attn.in_proj_weight.abs().max() > 1.1 * bound
    assert torch.count_nonzero(layer.linear1.bias) > 0 and torch.count_nonzero(torch_init.classifier.bias) > 0
    with pytest.raises(VlmcacheError, match="decoder init"):
        build_head("decoder", width, 5, heads=heads, init="timm")


# --------------------------------------------------------------------------- 13. second stages' weight decay


def _seed_decayed(module: nn.Module) -> set[str]:
    """The seed's `param_groups_weight_decay` (imblearn/nets/utils.py L86-93), as a set of decayed names."""
    return {n for n, p in module.named_parameters() if p.requires_grad and not (p.ndim <= 1 or n.endswith(".bias"))}


def _decayed(module: nn.Module, weight_decay: float) -> set[str]:
    cfg = TrainConfig(dataset="x", optimizer="sgd", weight_decay=weight_decay).resolve()
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    opt = make_optimizer(cfg, [p for _, p in named])
    ids = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    return {n for n, p in named if id(p) in ids}


@pytest.mark.parametrize("name", ["disalign", "marc"])
def test_disalign_and_marc_class_parameters_are_decayed_as_the_seeds_only_when_asked(name):
    head = build_head("linear", 8, 5)
    seed_form = build_stage2(name, head.classifier, decay=True)
    paper = build_stage2(name, head.classifier)
    scale, shift = ("alpha", "beta") if name == "disalign" else ("omega", "beta")
    assert getattr(seed_form, scale).shape == (1, 5) and getattr(paper, scale).shape == (5,)
    assert _decayed(seed_form, 5e-4) == _seed_decayed(seed_form)  # the seed's groups, name for name
    assert {scale, shift} <= _decayed(seed_form, 5e-4)
    assert not {scale, shift} & _decayed(paper, 5e-4)
    f = torch.randn(16, 8)
    assert torch.equal(seed_form(f), paper(f)) or name == "disalign"  # (1, C) broadcasts as (C,) does
    if name == "disalign":  # its confidence layer starts apart; with the same layer, the same logits
        seed_form.confidence.load_state_dict(paper.confidence.state_dict())
        assert torch.equal(seed_form(f), paper(f))


# --------------------------------------------------------------------------- 2. LDAM on a second stage


def test_ldam_on_a_crt_stage_over_a_cosine_head_is_scaled_once(tmp_path):
    from vlmcache.train import prepare_run

    rng = np.random.default_rng(0)
    x, y = long_tailed_features(rng, [60, 20, 8, 4])
    xt, yt = long_tailed_features(np.random.default_rng(1), [5, 5, 5, 5])
    write_feature_cache(tmp_path / "cache", "synth", {"train": (x, y, None), "test": (xt, yt, None)}, 4)
    common = dict(cache_dir=str(tmp_path / "cache"), runs_dir=str(tmp_path / "runs"), device="cpu", epochs=1)
    first = train_head(TrainConfig(dataset="synth", head="cosine", **common), log=lambda *a: None)
    for stage2 in ("crt", "lws"):
        cfg = TrainConfig(dataset=None, stage2=stage2, from_run=first["run"], loss="ldam", **common)
        job = prepare_run(cfg, log=lambda *a: None)
        f, labels = job.fit_data.x[:64].float(), job.fit_data.y[:64]
        classifier = job.fit_model.classifier
        cos = F.normalize(f, dim=-1) @ F.normalize(classifier.weight, dim=-1).T
        if stage2 == "lws":
            cos = job.fit_model.scale * cos
        m = torch.tensor([60, 20, 8, 4], dtype=torch.float64) ** -0.25
        m = (m * 0.5 / m.max()).float()
        expected = F.cross_entropy(30.0 * (cos - F.one_hot(labels, 4) * m[labels][:, None]), labels)
        got = job.loss_fn(job.fit_model(f), labels)
        assert got.item() == pytest.approx(expected.item(), rel=1e-5), stage2  # not 30 * (1 / 0.07) * cos
