"""`retr train`: data layouts and bad input, the shared loop (loss goes down, bit-identical
resume, atomic saves), DELG and MDA checkpoints loading through the normal plug-ins, and the
learned whitening published through the index writer. Small images, few steps: CPU-friendly."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from features.core import CheckpointError, ConfigError, DatasetError, IndexError_
from features.delg.trained import TrainedArch
from index.layout import IndexConfig, IndexPaths
from index.manifest import Manifest
from index.snapshot import IndexSnapshot
from index.whitening import Whitening
from retrieval.training import checkpoint
from retrieval.training.data import Augment, open_training_set
from retrieval.training.delg import DelgTask, DelgTrainConf
from retrieval.training.loop import LoopConf, train
from retrieval.training.mda import MdaTask, MdaTrainConf, diversity_loss
from retrieval.training.whitening import learn_whitening, publish_whitening, use_whitening
from tests import synthetic
from tests.corpus import MINI

CLASSES = {"sacre_coeur": 3, "tower_bridge": 2}
SMALL = DelgTrainConf(
    arch=TrainedArch(global_dim=32, local_dim=16, attention_hidden=16), image_size=64
)


def labelled_folder(root: Path, classes: dict[str, int] = CLASSES) -> Path:
    """DATA/<class>/<image> linked to landmarks-mini images (never copied into the repo)."""
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for p in sorted((MINI / "images" / name).glob("*.jpg"))[:n]:
            (root / name / p.name).symlink_to(p)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return open_training_set(labelled_folder(tmp_path_factory.mktemp("data")), keep_side=96)


def still(task: DelgTask | MdaTask) -> None:
    """No random crops or flips: every step sees the whole images (a loss that must go down)."""
    task.aug = Augment(size=task.aug.size, area=(1.0, 1.0), aspect=(1.0, 1.0), flip=False)


# --- data ----------------------------------------------------------------------------------------


def test_folder_layout_counts_corrupt_images(tmp_path: Path) -> None:
    root = labelled_folder(tmp_path / "d")
    (root / "tower_bridge" / "broken.jpg").write_bytes(b"\xff\xd8not a jpeg")
    ds = open_training_set(root, keep_side=64)
    assert ds.classes == ["sacre_coeur", "tower_bridge"]
    assert len(ds) == 5 and ds.labels.count(1) == 2
    assert [Path(p).name for p, _ in ds.skipped] == ["broken.jpg"]
    assert max(ds.images[0].shape[:2]) <= 64


def test_bad_training_sets_are_one_line_errors(tmp_path: Path) -> None:
    root = labelled_folder(tmp_path / "empty")
    (root / "nothing_here").mkdir()
    with pytest.raises(DatasetError, match="nothing_here: class folder holds no images"):
        open_training_set(root)
    root = labelled_folder(tmp_path / "one", {"sacre_coeur": 2, "tower_bridge": 1})
    with pytest.raises(DatasetError, match=r"fewer than 2 usable images: tower_bridge \(1\)"):
        open_training_set(root, keep_side=64)
    assert len(open_training_set(root, keep_side=64, min_images=1)) == 3
    with pytest.raises(DatasetError, match="not a directory"):
        open_training_set(tmp_path / "missing")


def test_gldv2_csv_must_match_the_images(tmp_path: Path) -> None:
    root = tmp_path / "gld"
    files = sorted((MINI / "images" / "sacre_coeur").glob("*.jpg"))[:2]
    ids = ["abc0001", "abd0002"]
    for i, f in zip(ids, files, strict=True):
        dest = root / "train" / i[0] / i[1] / i[2] / f"{i}.jpg"
        dest.parent.mkdir(parents=True)
        dest.symlink_to(f)
    (root / "train.csv").write_text("id,url,landmark_id\nzzz9,u,7\nzzz8,u,7\n")
    with pytest.raises(DatasetError, match="does not match the images"):
        open_training_set(root)
    (root / "train.csv").write_text(f"id,url,landmark_id\n{ids[0]},u,7\n{ids[1]},u,7\nmiss1,u,8\n")
    ds = open_training_set(root, keep_side=64)
    assert ds.classes == ["7"] and len(ds) == 2


# --- the loop ------------------------------------------------------------------------------------


def test_a_few_steps_lower_the_delg_loss(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    task = DelgTask(data, SMALL, batch_size=5, seed=0)
    still(task)
    images, labels = task.batch(0)
    task.model.eval()
    with torch.no_grad():
        before = float(task.losses(images, labels)["loss"])
    conf = LoopConf(steps=6, batch_size=5, lr=0.003, save_every=6, device="cpu")
    report = train(task, conf, tmp_path / "delg.pt")
    task.model.eval()
    with torch.no_grad():
        after = float(task.losses(images, labels)["loss"])
    assert after < before
    assert set(report.last) == {"loss", "global", "attention", "reconstruction"}
    rows = (tmp_path / "delg.pt.csv").read_text().splitlines()
    assert rows[0].startswith("step,lr,loss,global") and len(rows) == 7


class Killed(Exception):
    pass


def test_resume_is_bit_identical(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    conf = LoopConf(steps=4, batch_size=3, lr=0.01, save_every=2, device="cpu")
    full = DelgTask(data, SMALL, batch_size=3, seed=1)
    train(full, conf, tmp_path / "full.pt")

    killed = DelgTask(data, SMALL, batch_size=3, seed=1)
    batch = killed.batch

    def dies_at_3(step: int):  # type: ignore[no-untyped-def]
        if step == 3:
            raise Killed
        return batch(step)

    killed.batch = dies_at_3  # type: ignore[method-assign]
    with pytest.raises(Killed):
        train(killed, conf, tmp_path / "resumed.pt")
    assert checkpoint.load(tmp_path / "resumed.pt.train", "state")["step"] == 2
    with pytest.raises(CheckpointError, match="already exists; pass --resume"):
        train(DelgTask(data, SMALL, batch_size=3, seed=1), conf, tmp_path / "resumed.pt")
    resumed = DelgTask(data, SMALL, batch_size=3, seed=1)
    report = train(resumed, conf, tmp_path / "resumed.pt", resume=True)
    assert report.resumed_from == 2
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the logs agree but for the throughput column
    losses = [r.split(",")[:6] for r in (tmp_path / "resumed.pt.csv").read_text().splitlines()]
    assert losses == [r.split(",")[:6] for r in (tmp_path / "full.pt.csv").read_text().splitlines()]

    other = LoopConf(steps=4, batch_size=3, lr=0.02, save_every=2, device="cpu")
    with pytest.raises(CheckpointError, match="other settings"):
        train(
            DelgTask(data, SMALL, batch_size=3, seed=1), other, tmp_path / "resumed.pt", resume=True
        )


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "ckpt.pt"
    checkpoint.save({"step": 1, "w": torch.ones(3)}, path)

    def no_space(obj: object, f: object) -> None:
        Path(str(f)).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(CheckpointError, match="No space left on device.*previous one is kept"):
        checkpoint.save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    kept = checkpoint.load(path, "test")
    assert kept["step"] == 1 and torch.equal(kept["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


# --- checkpoints through the plug-ins ------------------------------------------------------------


def test_trained_global_model_loads_with_a_fingerprint(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from features.registry import load_global, load_local
    from retrieval.cli import app

    ckpt = tmp_path / "g.pt"
    args = ["train", "global", str(data.root), "--out", str(ckpt), "--image-size", "64"]
    args += ["--global-dim", "32", "--batch-size", "2", "--device", "cpu", "-q"]
    out = CliRunner().invoke(app, [*args, "--steps", "1"])
    assert out.exit_code == 0, out.output
    assert "5 images in 2 classes (0 skipped)" in " ".join(out.output.split())
    model = load_global(f"trained:{ckpt}", {"resize_max": 96, "scales": [1.0]})
    desc = model.extract(data.images[0])
    assert desc.shape == (32,) and abs(float(np.linalg.norm(desc)) - 1) < 1e-5
    IndexConfig.parse({"global_model": f"trained:{ckpt}"})
    local = load_local("delg", {"weights": str(ckpt), "resize_max": 96})
    feats = local.extract(data.images[0])  # the trained attention + autoencoder branch
    assert feats.descriptors.shape[1] == 128 and 0 < len(feats) <= 1000
    fp = model.fingerprint
    out = CliRunner().invoke(app, [*args, "--steps", "2", "--resume"])
    assert out.exit_code == 0, out.output
    assert load_global(f"trained:{ckpt}", {"resize_max": 96}).fingerprint != fp
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_global(f"trained:{tmp_path / 'bad.pt'}")
    with pytest.raises(Exception, match="does not exist"):
        load_global(f"trained:{tmp_path / 'none.pt'}")


def test_mda_training_writes_a_checkpoint_the_plugin_loads(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from features.local.mda import MDA

    conf = MdaTrainConf(image_size=64)
    task = MdaTask(data, conf, batch_size=2, seed=0)
    report = train(task, LoopConf(steps=2, batch_size=2, device="cpu"), tmp_path / "mda.pt")
    assert set(report.last) == {"loss", "classification", "diversity"}
    mda = MDA(weights=str(tmp_path / "mda.pt"), resize_max=96, pyramid=(1.0,), max_keypoints=50)
    feats = mda.extract(data.images[0])
    assert feats.descriptors.shape[1] == 128 and 0 < len(feats) <= 50


def test_diversity_loss_is_zero_for_disjoint_heads_and_one_for_equal() -> None:
    same = torch.ones(1, 2, 3, 3)
    apart = torch.zeros(1, 2, 3, 3)
    apart[0, 0, 0, 0] = apart[0, 1, 2, 2] = 1.0
    assert float(diversity_loss(same)) == pytest.approx(1.0, abs=1e-5)
    assert float(diversity_loss(apart)) == pytest.approx(0.0, abs=1e-5)


# --- learned whitening ---------------------------------------------------------------------------


def test_learned_whitening_brings_matching_pairs_closer() -> None:
    rng = np.random.default_rng(0)
    d, n = 16, 200
    centres = rng.normal(size=(n, d))
    nuisance = np.zeros(d)
    nuisance[:3] = 5.0  # matching views differ strongly along 3 directions
    a = centres + rng.normal(size=(n, d)) * 0.1 + rng.normal(size=(n, d)) * nuisance
    b = centres + rng.normal(size=(n, d)) * 0.1 + rng.normal(size=(n, d)) * nuisance
    w = learn_whitening(np.concatenate([a, b]), a[:100], b[:100], shrinkage=0.01)
    plain = Whitening.identity(d)

    def recall(wh: Whitening) -> float:  # held-out pairs: is b[i] a's nearest neighbour?
        qa, qb = wh.apply(a[100:]), wh.apply(b[100:])
        return float(np.mean(np.argmax(qa @ qb.T, axis=1) == np.arange(100)))

    assert recall(w) > recall(plain) + 0.2
    mixed = learn_whitening(np.concatenate([a, b]), a[:100], b[:100], mix=0.5)
    assert mixed.projection.shape == (d, d)


def test_learned_whitening_is_published_kept_by_builds_and_reverted(tmp_path: Path) -> None:
    root = str(tmp_path / "idx")
    synthetic.run(root, "build", [f"g/{i}.jpg" for i in range(6)])
    paths = IndexPaths(root)
    pca = Manifest.load(paths.root).whitening
    learned = Whitening(
        np.ones(synthetic.GDIM, np.float32), 2 * np.eye(synthetic.GDIM, dtype=np.float32), 0.1
    )
    with pytest.raises(IndexError_, match="no learned whitening"):
        use_whitening(root, "learned")
    publish_whitening(root, learned)
    m = Manifest.load(paths.root)
    assert m.whitening_kind == "learned" and m.whitening_other == pca
    snap = IndexSnapshot.open(paths)
    assert np.array_equal(snap.whitening.mean, learned.mean)
    queries = learned.apply(snap.store.global_descriptors())
    scores, ids = snap.vectors.search(queries, 1)  # vectors re-projected with the learned one
    assert np.allclose(scores[:, 0], 1.0, atol=1e-4)
    assert np.array_equal(ids[:, 0], snap.store.ids())
    snap.close()

    synthetic.run(root, "add", ["g/new.jpg"])  # an add keeps it
    synthetic.run(root, "build", ["g/other.jpg"])  # a build refits only the PCA one
    m2 = Manifest.load(paths.root)
    assert m2.whitening_kind == "learned" and m2.whitening == m.whitening
    assert m2.whitening_other is not None and m2.whitening_other != pca
    use_whitening(root, "pca")
    m3 = Manifest.load(paths.root)
    assert m3.whitening_kind == "pca" and m3.whitening == m2.whitening_other
    assert m3.whitening_other == m.whitening
    assert (paths.root / m3.whitening_other.name).is_file()
    with pytest.raises(ConfigError, match="unknown whitening"):
        use_whitening(root, "zca")


def test_a_lost_learned_whitening_is_found_and_repaired_to_pca(tmp_path: Path) -> None:
    from index.check import check_index
    from index.repair import repair_index

    root = str(tmp_path / "idx")
    synthetic.run(root, "build", [f"g/{i}.jpg" for i in range(6)])
    paths = IndexPaths(root)
    pca = Manifest.load(paths.root).whitening
    dim = synthetic.GDIM
    publish_whitening(root, Whitening(np.zeros(dim, np.float32), np.eye(dim, dtype=np.float32), 0))
    learned = Manifest.load(paths.root).whitening
    assert learned is not None and pca is not None
    (paths.root / learned.name).unlink()
    assert any(learned.name in p for p in check_index(root).problems)
    actions = " ".join(repair_index(root).actions)
    assert "learned whitening was lost" in actions
    m = Manifest.load(paths.root)
    assert m.whitening_kind == "pca" and m.whitening == pca and m.whitening_other is None
    assert not check_index(root).problems
    snap = IndexSnapshot.open(paths)
    assert len(snap.vectors.search(snap.whitening.apply(snap.store.global_descriptors()), 1)[1])
    snap.close()


@pytest.mark.slow  # builds the served index when run alone (20 s), mines it (about 30 s)
def test_train_whitening_mines_the_index_through_search(served_index, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from retrieval.cli import app
    from retrieval.training.whitening import LearnedWhiteningConf, train_whitening
    from tests.serving import writable_copy

    served = writable_copy(served_index, tmp_path)
    report = train_whitening(served.index, LearnedWhiteningConf(shortlist=5, min_pairs=1))
    assert report.pairs >= 1 and report.searched == 12  # 10 labelled images, 2 distractors
    assert Manifest.load(served.index).whitening_kind == "learned"
    out = CliRunner().invoke(app, ["train", "whitening", "--index", str(served.index), "--revert"])
    assert out.exit_code == 0, out.output
    assert "now uses its pca whitening" in " ".join(out.output.split())
    assert Manifest.load(served.index).whitening_kind == "pca"


def test_too_few_verified_pairs_is_an_error(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from retrieval.training import whitening

    root = tmp_path / "idx"
    synthetic.run(str(root), "build", [f"g/{i}.jpg" for i in range(4)])
    monkeypatch.setattr(whitening.Retriever, "open", lambda *a, **k: None)
    monkeypatch.setattr(
        whitening, "mine_pairs", lambda *a, **k: whitening.MinedPairs([(1, 2)], [30], 4)
    )
    with pytest.raises(ConfigError, match="only 1 verified pairs among 4 images"):
        whitening.train_whitening(root, whitening.LearnedWhiteningConf(min_pairs=5))


def test_cli_train_errors_are_one_line(tmp_path: Path) -> None:
    from retrieval.cli import app

    (tmp_path / "d" / "empty").mkdir(parents=True)
    out = CliRunner().invoke(
        app, ["train", "global", str(tmp_path / "d"), "--out", str(tmp_path / "x.pt")]
    )
    assert out.exit_code == 1
    assert "class folder holds no images" in out.output and "Traceback" not in out.output
