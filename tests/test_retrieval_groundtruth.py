"""Oxford/Paris ground truth: the restricted unpickler refuses code, well-formed files
round-trip, wrong structures are refused with one line, classic folders parse."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from deepcluster.retrieval.groundtruth import (GroundTruthError, crop_query, load_classic, load_ground_truth,
                                               load_revisited, safe_unpickle)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _gt():
    return {"imlist": ["a", "b", "c", "d", "e"], "qimlist": ["q1", "q2"],
            "gnd": [{"bbx": [1.0, 2.0, 30.5, 40.0], "easy": np.array([0, 1]), "hard": np.array([3]),
                     "junk": np.array([], dtype=np.int64)},
                    {"bbx": np.array([0.0, 0.0, 5.0, 5.0]), "easy": [4], "hard": [], "junk": [0, np.int64(2)]}]}


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))  # the payload is real: plain pickle runs it
    assert control.exists()
    path = tmp_path / "gnd_roxford5k.pkl"
    obj = _gt()
    obj["gnd"][0]["junk"] = _Payload(marker)  # hidden inside an otherwise valid file
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(GroundTruthError, match=r"posix\.system|os\.system") as err:
        load_revisited(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()
    with pytest.raises(GroundTruthError, match="builtins.eval"):
        safe_unpickle(b"cbuiltins\neval\n(S'1+1'\ntR.")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_well_formed_ground_truth_round_trips(tmp_path, protocol):
    path = tmp_path / "gnd.pkl"
    path.write_bytes(pickle.dumps(_gt(), protocol=protocol))
    gt = load_ground_truth(path)
    assert gt.protocol == "revisited" and gt.imlist == ["a", "b", "c", "d", "e"] and gt.qimlist == ["q1", "q2"]
    np.testing.assert_array_equal(gt.bbx, [[1, 2, 30.5, 40], [0, 0, 5, 5]])
    np.testing.assert_array_equal(gt.gnd[0]["easy"], [0, 1])
    np.testing.assert_array_equal(gt.gnd[1]["junk"], [0, 2])
    medium = gt.settings()["medium"]
    np.testing.assert_array_equal(np.sort(medium[0]["ok"]), [0, 1, 3])
    hard = gt.settings()["hard"]
    assert hard[1]["ok"].size == 0 and sorted(hard[1]["junk"]) == [0, 2, 4]


def _mutations():
    def drop_gnd(o):
        del o["gnd"]

    def short_gnd(o):
        o["gnd"] = o["gnd"][:1]

    def out_of_range(o):
        o["gnd"][0]["easy"] = [0, 9]

    def overlap(o):
        o["gnd"][1]["junk"] = [4]

    def bad_box(o):
        o["gnd"][0]["bbx"] = [5, 5, 1, 1]

    def names(o):
        o["imlist"] = [1, 2, 3]

    return [(drop_gnd, "expected a dict with imlist"), (short_gnd, "one entry per query"),
            (out_of_range, r"gnd\[0\]\['easy'\] holds indices outside 0..4"),
            (overlap, "both as easy and as junk"), (bad_box, "is not a box"), (names, "imlist is not a list")]


@pytest.mark.parametrize("mutate,message", _mutations())
def test_wrong_structure_is_refused(tmp_path, mutate, message):
    obj = _gt()
    mutate(obj)
    path = tmp_path / "gnd.pkl"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(GroundTruthError, match=message) as err:
        load_revisited(path)
    assert "\n" not in str(err.value)


def test_not_a_pickle_and_not_a_dict(tmp_path):
    path = tmp_path / "gnd.pkl"
    path.write_bytes(b"just text\n")
    with pytest.raises(GroundTruthError, match="not a readable ground-truth pickle"):
        load_revisited(path)
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(GroundTruthError, match="got list"):
        load_revisited(path)
    with pytest.raises(GroundTruthError, match="cannot read"):
        load_revisited(tmp_path / "missing.pkl")


def test_classic_folder(tmp_path):
    names = ["all_souls_000001", "all_souls_000002", "radcliffe_000001", "radcliffe_000002", "other_000001"]
    files = {"all_souls_1_query.txt": "oxc1_all_souls_000002 1.5 2 40 30.25\n",
             "all_souls_1_good.txt": "all_souls_000001\n", "all_souls_1_ok.txt": "all_souls_000002\n",
             "all_souls_1_junk.txt": "other_000001\n",
             "radcliffe_1_query.txt": "oxc1_radcliffe_000001 0 0 10 10\n",
             "radcliffe_1_good.txt": "radcliffe_000001\nradcliffe_000002\n", "radcliffe_1_ok.txt": "",
             "radcliffe_1_junk.txt": ""}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    gt = load_classic(tmp_path, names)
    assert gt.protocol == "classic" and gt.qimlist == ["all_souls_000002", "radcliffe_000001"]
    np.testing.assert_array_equal(gt.bbx[0], [1.5, 2, 40, 30.25])
    classic = gt.settings()["classic"]
    assert sorted(classic[0]["ok"]) == [0, 1] and list(classic[0]["junk"]) == [4]
    assert sorted(classic[1]["ok"]) == [2, 3]
    with pytest.raises(GroundTruthError, match="not in the database"):
        load_classic(tmp_path, names[:3])
    with pytest.raises(GroundTruthError, match="give the database image names"):
        load_ground_truth(tmp_path)
    (tmp_path / "radcliffe_1_ok.txt").unlink()
    with pytest.raises(GroundTruthError, match="radcliffe_1_ok.txt is missing"):
        load_classic(tmp_path, names)


def test_crop_query_rounds_and_clips():
    img = Image.fromarray(np.arange(80, dtype=np.uint8).reshape(8, 10))
    crop = crop_query(img, [2.4, 1.6, 7.6, 6.0])  # rounds to (2, 2, 8, 6): 6 x 4 pixels
    assert crop.size == (6, 4)
    np.testing.assert_array_equal(np.asarray(crop), np.arange(80).reshape(8, 10)[2:6, 2:8])
    assert crop_query(img, [5, 5, 50, 50]).size == (5, 3)
    with pytest.raises(GroundTruthError, match="outside"):
        crop_query(img, [20, 20, 30, 30])
