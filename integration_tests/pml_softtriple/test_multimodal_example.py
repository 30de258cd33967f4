"""examples/softtriple_multimodal.py and softtriple_tasks.py: class-disjoint tasks, the search, the report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
import optuna
import pytest
import torch
from scipy import stats

from integration_tests.helpers.examples import load_example


@pytest.fixture(scope="module")
def mm() -> ModuleType:
    return load_example("softtriple_multimodal.py")


@pytest.fixture(scope="module")
def tiny_task(mm: ModuleType):
    return mm.tasks.multimodal_task(size=12, modes_per_class=3, fonts_per_char=2, max_classes=9)


def _check_split(task) -> None:
    assert len(np.intersect1d(task.train, task.test)) == 0
    assert set(task.val) <= set(task.train) and 0 < len(task.val) < len(task.train)
    assert set(np.concatenate([task.train, task.test])) == set(np.unique(task.labels))
    (x_fit, y_fit, _), (x_val, y_val, _) = task.search_split()
    (x_train, _, _), (x_test, y_test, _) = task.final_split()
    # labels renumbered 0..n-1 per split, and the images are the right classes' images
    for x, y, classes in ((x_val, y_val, task.val), (x_test, y_test, task.test)):
        assert set(y) == set(range(len(classes)))
        assert len(x) == np.isin(task.labels, classes).sum()
    assert len(x_fit) + len(x_val) == len(x_train)
    assert set(y_fit) == set(range(len(task.train) - len(task.val)))
    assert task.images.dtype == np.float32 and 0 <= task.images.min() and task.images.max() <= 1


def test_multimodal_classes_are_unions_of_distinct_characters(tiny_task) -> None:
    _check_split(tiny_task)
    for c in np.unique(tiny_task.labels):
        modes = np.unique(tiny_task.modes[tiny_task.labels == c])
        assert len(modes) == 3  # three characters per class, two fonts each
        assert (tiny_task.labels == c).sum() == 6
    # no character belongs to two classes, and every glyph image has ink
    assert len(np.unique(tiny_task.modes)) == 3 * len(np.unique(tiny_task.labels))
    assert (tiny_task.images.reshape(len(tiny_task.images), -1).max(1) > 0.2).all()


def test_lookalike_characters_are_dropped(mm: ModuleType) -> None:
    fonts = mm.tasks.available_fonts()
    dejavu = next(p for n, p in fonts if n == "DejaVu Sans Book")
    # Latin A and Greek Alpha, Latin o and Cyrillic o are drawn alike; Cyrillic Zhe is unlike both
    assert mm.tasks._distinct("AΑoоЖ", dejavu) == "AoЖ"


def test_hangul_task_is_many_small_classes(mm: ModuleType) -> None:
    if len(mm.tasks.hangul_fonts()) < 3:
        with pytest.raises(ValueError, match="instances_per_class"):
            mm.tasks.hangul_task(num_classes=20, instances_per_class=3)
        pytest.skip("hangul fonts not installed (apt-get install fonts-nanum fonts-unfonts-core)")
    task = mm.tasks.hangul_task(num_classes=30, instances_per_class=3, size=12)
    _check_split(task)
    assert np.bincount(task.labels).tolist() == [3] * 30
    with pytest.raises(ValueError, match="num_classes"):
        mm.tasks.hangul_task(num_classes=20_000)


def test_search_space_and_losses(mm: ModuleType) -> None:
    for method in mm.METHODS:
        params = mm.suggest(
            optuna.trial.FixedTrial(
                {"la": 20.0, "margin": 0.1, "centers_per_class": 5, "gamma": 0.1, "tau": 0.2}
            ),
            method,
        )
        loss = mm.make_loss(method, params, 4, 8)
        k = 1 if method == "norm_softmax" else 5
        assert loss.fc.shape == (8, 4 * k)
        assert ("tau" in params) == (method == "softtriple")
    with pytest.raises(ValueError, match="method"):
        mm.make_loss("arcface", {}, 4, 8)


def test_strong_augment_keeps_shape_and_range(mm: ModuleType) -> None:
    images = torch.rand(16, 1, 12, 12)
    out = mm.strong_augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
    again = mm.strong_augment(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and not torch.allclose(out, images)


def test_train_reports_every_epoch_and_counts_centres(mm: ModuleType, tiny_task) -> None:
    budget = replace(mm.QUICK["multimodal"], epochs=2, batch_size=8)
    fit, score = tiny_task.search_split()
    seen = []
    params = {"la": 20.0, "margin": 0.01, "centers_per_class": 5, "gamma": 0.1, "tau": 0.2}
    result = mm.train("softtriple", params, fit, score, budget, 0, report=lambda e, v: seen.append((e, v)))
    assert [e for e, _ in seen] == [0, 1]
    assert seen[-1][1] == result["metrics"]["mean_average_precision_at_r"]
    assert result["metrics"]["precision_at_1"] == result["metrics"]["recall_at_1"]
    assert len(result["kept"]) == len(np.unique(fit[1])) and all(1 <= k <= 5 for k in result["kept"])

    def prune(epoch: int, value: float) -> None:
        raise optuna.TrialPruned()

    with pytest.raises(optuna.TrialPruned):
        mm.train("norm_softmax", {"la": 20.0, "margin": 0.0}, fit, score, budget, 0, report=prune)


def test_t_interval_is_students(mm: ModuleType) -> None:
    diffs = np.array([0.01, 0.03, 0.02, 0.05, 0.04])
    low, high = stats.t.interval(0.95, 4, loc=diffs.mean() * 100, scale=stats.sem(diffs * 100))
    assert mm.t_interval(diffs) == f"{diffs.mean() * 100:+.1f} [{low:+.1f}, {high:+.1f}]"


@pytest.mark.slow
def test_quick_run_writes_the_report_and_the_studies(mm: ModuleType, tmp_path: Path) -> None:
    assert mm.main(["--quick", "--tasks", "multimodal", "--jobs", "1", "--out", str(tmp_path)]) == 0
    storage = mm._storage(tmp_path / "optuna_journal.log")
    for method in mm.METHODS:
        study = optuna.load_study(study_name=f"multimodal-{method}", storage=storage)
        assert len(study.trials) == mm.QUICK["multimodal"].trials  # the same budget for every method
        assert ("centers_per_class" in study.best_params) == (method != "norm_softmax")
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted((r["method"], r["seed"]) for r in results) == sorted(
        (m, s) for m in mm.METHODS for s in (0, 1)
    )
    # several characters per class: glyph-level retrieval is scored too
    assert all(r["metrics"]["glyph_map_at_r"] >= 0 for r in results)
    report = (tmp_path / "report.md").read_text()
    assert "glyph MAP@R" in report
    assert "softtriple − norm_softmax" in report
    assert all(mm.LABELS[m] in report for m in mm.METHODS)
    # --report-from rebuilds the same task section from the saved run (studies, results, task, budget)
    assert mm.main(["--report-from", str(tmp_path), "--out", str(tmp_path / "merged")]) == 0
    merged = (tmp_path / "merged" / "report.md").read_text()
    section = report[report.index("## Task `multimodal`") :]
    assert section in merged and "Command: `python examples/softtriple_multimodal.py --quick" in merged
