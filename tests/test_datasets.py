import json

import numpy as np
import pytest
from conftest import SHARED_DATA, write_split_dataset
from typer.testing import CliRunner

from vlmcache.cli import app
from vlmcache.datasets import load_dataset, parse_split_files
from vlmcache.errors import VlmcacheError
from vlmcache.splits import read_split_file, split_stats

PLACES_TRAIN = {
    "images": 62500,
    "classes": 365,
    "max_per_class": 4980,
    "min_per_class": 5,
    "many": 131,
    "medium": 163,
    "few": 71,
}


def test_places_lt_statistics_from_the_real_split_file():
    path = SHARED_DATA / "places_lt" / "Places_LT_train.txt"
    if not path.is_file():
        pytest.skip(f"{path} is not beside this checkout")
    _, labels = read_split_file(path)
    stats = split_stats(labels)
    assert {k: stats[k] for k in PLACES_TRAIN} == PLACES_TRAIN


def test_places_lt_statistics_from_the_cli_json():
    path = SHARED_DATA / "places_lt" / "Places_LT_train.txt"
    if not path.is_file():
        pytest.skip(f"{path} is not beside this checkout")
    result = CliRunner().invoke(app, ["datasets", "info", "places_lt", "--split-file", str(path), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert {k: got[k] for k in PLACES_TRAIN} == PLACES_TRAIN


def test_shipped_places_split_equals_the_shared_file():
    ds = load_dataset("places_lt")
    stats = split_stats(ds.splits["train"].labels)
    assert {k: stats[k] for k in PLACES_TRAIN} == PLACES_TRAIN
    assert len(ds.classnames) == 365 and ds.classnames[1] == "airplane cabin"
    assert "apartment building (outdoor)" in ds.classnames
    assert {s: len(sp) for s, sp in ds.splits.items()} == {"train": 62500, "val": 7300, "test": 36500}


def test_benchmarks_ship_their_small_splits_and_say_how_to_get_train():
    inat = load_dataset("inat18")
    assert list(inat.splits) == ["val"] and len(inat.splits["val"]) == 24426 and inat.num_classes == 8142
    assert "train2018.json" in inat.notes[0] and "--split-file train=PATH" in inat.notes[0]
    imnet = load_dataset("imagenet_lt")
    assert imnet.classnames[:2] == ["tench", "goldfish"] and imnet.num_classes == 1000
    assert set(imnet.splits) == {"val", "test"}


def test_split_file_override_and_inat_json(tmp_path):
    files = write_split_dataset(tmp_path, {"train": [3, 2]})
    ds = load_dataset("places_lt", tmp_path, {"train": str(files["train"])})
    assert len(ds.splits["train"]) == 5 and ds.splits["train"].origin == str(files["train"])
    coco = {
        "images": [{"id": 7, "file_name": "a/x.jpg"}, {"id": 9, "file_name": "b/y.jpg"}],
        "annotations": [{"image_id": 9, "category_id": 8141}, {"image_id": 7, "category_id": 0}],
    }
    (tmp_path / "train2018.json").write_text(json.dumps(coco))
    inat = load_dataset("inat18", tmp_path)
    assert inat.splits["train"].source.relpaths == ["b/y.jpg", "a/x.jpg"]
    assert inat.splits["train"].labels.tolist() == [8141, 0]


@pytest.mark.parametrize(
    "text, message",
    [
        ("a.jpg 0\nb.jpg\n", "line 2: expected 'relative/path label'"),
        ("a.jpg 0\n\nb.jpg x\n", "line 3: the label 'x' is not a non-negative integer"),
        ("a.jpg -1\n", "line 1: the label '-1' is not a non-negative integer"),
        ("a.jpg 0\nb.jpg \u0663\n", "line 2: the label '\u0663' is not a non-negative integer"),
        ("a.jpg 1_0\n", "line 1: the label '1_0' is not a non-negative integer"),
        ("a.jpg 0\nb.jpg 3\n", "line 2: the label 3 is out of range (valid: 0..2)"),
        ("/etc/passwd 0\n", "line 1: the path '/etc/passwd' is absolute"),
        ("ok.jpg 0\nimgs/../../secret.jpg 1\n", "line 2: the path 'imgs/../../secret.jpg' contains '..'"),
        ("\n\n", "holds no images"),
    ],
)
def test_bad_split_files_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(VlmcacheError) as e:
        read_split_file(path, num_classes=3)
    assert message in str(e.value) and str(path) in str(e.value)


def test_paths_with_spaces_and_missing_files(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("my photos/a b.jpg 1\n")
    rel, labels = read_split_file(path)
    assert rel == ["my photos/a b.jpg"] and labels.tolist() == [1]
    with pytest.raises(VlmcacheError, match="does not exist"):
        read_split_file(tmp_path / "nope.txt")
    with pytest.raises(VlmcacheError, match="NAME=PATH"):
        parse_split_files(["train.txt"])
    with pytest.raises(VlmcacheError, match="twice"):
        parse_split_files(["train=a", "train=b"])


def test_split_dataset_labels_checked_against_classnames(split_dataset):
    root, files = split_dataset
    (root / "two.txt").write_text("one\ntwo\n")
    with pytest.raises(VlmcacheError, match="label 2 is out of range"):
        load_dataset("split", root, {"train": str(files["train"])}, classnames_file=str(root / "two.txt"))
    ds = load_dataset("split", root, {"train": str(files["train"])}, classnames_file=str(root / "classnames.txt"))
    assert ds.classnames == ["red thing", "green thing", "blue thing"]


def test_unknown_names_list_the_choices(tmp_path):
    with pytest.raises(VlmcacheError, match="Choose one of: imagenet_lt, places_lt"):
        load_dataset("places-lt")
    with pytest.raises(VlmcacheError, match="does not exist"):
        load_dataset("places_lt", tmp_path / "missing")


def test_imagefolder_with_split_folders(tmp_path):
    write_split_dataset(tmp_path, {"train": [4, 2], "val": [1, 1]})
    ds = load_dataset("imagefolder", tmp_path / "images")
    assert ds.classnames == ["c0", "c1"] and set(ds.splits) == {"train", "val"}
    assert ds.splits["train"].labels.tolist() == [0, 0, 0, 0, 1, 1] and not ds.notes


def test_imagefolder_holdout_is_stratified_seeded_and_stated(tmp_path):
    write_split_dataset(tmp_path, {"all": [20, 10, 5]})
    a = load_dataset("imagefolder", tmp_path / "images" / "all", holdout=0.2, seed=1)
    b = load_dataset("imagefolder", tmp_path / "images" / "all", holdout=0.2, seed=1)
    assert np.bincount(a.splits["test"].labels).tolist() == [4, 2, 1]
    assert np.bincount(a.splits["train"].labels).tolist() == [16, 8, 4]
    assert a.splits["test"].source.relpaths == b.splits["test"].source.relpaths
    assert not set(a.splits["test"].source.relpaths) & set(a.splits["train"].source.relpaths)
    assert "held out 20% of each class (seed 1)" in a.notes[0]


def test_digits_lt_is_long_tailed_with_a_balanced_test_split():
    ds = load_dataset("digits_lt")
    train = np.bincount(ds.splits["train"].labels)
    assert train[0] / train[-1] == pytest.approx(10, rel=0.01) and (np.diff(train) < 0).all()
    assert np.bincount(ds.splits["test"].labels).tolist() == [30] * 10
    stats = split_stats(ds.splits["train"].labels)
    assert stats["many"] > 0 and stats["medium"] > 0 and stats["few"] > 0
    assert ds.splits["train"].source.load(0).mode == "RGB"


def test_datasets_info_groups_val_and_test_classes_by_their_training_counts():
    """Shot groups are defined by training counts: Places-LT's test split has 100 images of every class, which
    by its own counts would make all 365 classes medium-shot."""
    got = json.loads(CliRunner().invoke(app, ["datasets", "info", "places_lt", "--json"]).stdout)
    groups = {s: (st["many"], st["medium"], st["few"]) for s, st in got["splits"].items()}
    train = (PLACES_TRAIN["many"], PLACES_TRAIN["medium"], PLACES_TRAIN["few"])
    assert groups == {"train": train, "val": train, "test": train}
    assert got["splits"]["test"]["groups_by"] == "train counts"
    test_file = SHARED_DATA / "places_lt" / "Places_LT_test.txt"
    train_file = SHARED_DATA / "places_lt" / "Places_LT_train.txt"
    if not test_file.is_file():
        pytest.skip(f"{test_file} is not beside this checkout")
    args = ["datasets", "info", "places_lt", "--split-file", str(test_file), "--json"]
    alone = json.loads(CliRunner().invoke(app, args).stdout)
    assert (alone["many"], alone["medium"], alone["few"], alone["groups_by"]) == (0, 365, 0, "own counts")
    paired = json.loads(CliRunner().invoke(app, [*args, "--train-split-file", str(train_file)]).stdout)
    assert (paired["many"], paired["medium"], paired["few"], paired["groups_by"]) == (*train, "train counts")
