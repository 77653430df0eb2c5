"""Sweeps (#20): the grid, one run per point under one folder, the reference pass shared, a killed sweep continued
without repeating finished points, and the frontier's numbers (non-dominated points, the recommendation) worked by
hand."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from lora_dpo.cli.main import main
from lora_dpo.config import save_recipe
from lora_dpo.errors import ConfigError
from lora_dpo.run.metrics import read_metrics
from lora_dpo.run.rundir import RunDir
from lora_dpo.sweep import Frontier, Point, parse_grid, run_sweep
from lora_dpo.sweep.frontier import mark_pareto, recommend
from lora_dpo.training import loop, reference

# the toy world, shrunk: 48 pairs, 4 steps of 8, a checkpoint at step 2, 16 held-out pairs, 4 sampled prompts
SMALL = ["output_dir=runs/t", "data.max_rows=48", "train.max_steps=4", "train.save_every=2", "train.eval_every=2",
         "eval.max_pairs=16", "eval.num_prompts=4", "eval.max_new_tokens=16", "train.reference_cache=null"]


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_grid_is_every_combination_named_by_what_it_sets():
    grid = parse_grid(["loss.beta=0.05,0.1", "loss.name=dpo,ipo"])
    assert grid.points() == [
        ("beta-0.05_name-dpo", ["loss.beta=0.05", "loss.name=dpo"]),
        ("beta-0.05_name-ipo", ["loss.beta=0.05", "loss.name=ipo"]),
        ("beta-0.1_name-dpo", ["loss.beta=0.1", "loss.name=dpo"]),
        ("beta-0.1_name-ipo", ["loss.beta=0.1", "loss.name=ipo"]),
    ]
    assert parse_grid(["train.lr=1e-4,5e-4"]).points()[0] == ("lr-1e-4", ["train.lr=1e-4"])


@pytest.mark.parametrize("specs, message", [
    ([], "give at least one"),
    (["loss.beta"], "expected KEY=V1,V2"),
    (["loss.bta=0.1,0.2"], "loss.bta is not a recipe key"),
    (["loss.beta=0.1", "loss.beta=0.2"], "given twice"),
    (["loss.beta=0.1,0.1"], "a value is repeated"),
])  # fmt: skip
def test_a_bad_grid_is_refused_naming_it(specs, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid(specs)


def test_a_bad_value_of_any_point_stops_the_sweep_before_anything_trains(here, capsys):
    assert main(["sweep", "toy", *SMALL, "--grid", "loss.beta=0.1,-1"]) == 2
    assert "sweep point beta--1: loss.beta: must be > 0" in capsys.readouterr().err
    assert not (here / "runs").exists()


def test_a_sweep_shares_one_reference_pass_and_a_killed_one_continues_where_it_stopped(here, monkeypatch, capsys):
    passes = []
    real_compute = reference.compute_table
    monkeypatch.setattr(reference, "compute_table", lambda *a, **k: passes.append(a[3]) or real_compute(*a, **k))
    trained = []
    grid = parse_grid(["loss.beta=0.05,0.2,0.8"])

    def killed_in_the_second_point(recipe):
        trained.append(recipe.output_dir)
        if len(trained) == 2:  # the second point is killed after its checkpoint at step 2: what a kill leaves
            loop.train(dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, max_steps=2)))
            run = RunDir(recipe.output_dir)
            run.eval.unlink()
            shutil.rmtree(run.adapter)
            save_recipe(recipe, run.config)  # the run was started for 4 steps
            raise KeyboardInterrupt
        return loop.train(recipe)

    with pytest.raises(KeyboardInterrupt):
        run_sweep("toy", SMALL, grid, train_fn=killed_in_the_second_point)
    folder = here / "runs" / "t-sweep"
    assert (folder / "beta-0.05" / "eval.json").is_file() and not (folder / "beta-0.2" / "eval.json").exists()
    assert len(passes) == 2  # the training and held-out tables, once: the second point read them from the cache

    trained.clear()
    capsys.readouterr()
    front = run_sweep("toy", SMALL, grid, train_fn=lambda r: trained.append(r.output_dir) or loop.train(r))
    err = capsys.readouterr().err
    assert trained == ["runs/t-sweep/beta-0.2", "runs/t-sweep/beta-0.8"]  # the finished point is not repeated
    assert "beta-0.05 (done), beta-0.2 (resume), beta-0.8 (new)" in err
    assert "resuming from runs/t-sweep/beta-0.2/checkpoints/step-2" in err
    assert [r["step"] for r in read_metrics(folder / "beta-0.2" / "metrics.jsonl") if r["split"] == "train"] == [1, 2, 3, 4]
    assert len(passes) == 2  # still once for the whole sweep
    assert sorted(p.name for p in front.finals) == ["beta-0.05", "beta-0.2", "beta-0.8"] and not front.pending

    record = json.loads((folder / "sweep.json").read_text())
    assert record["grid"] == {"loss.beta": [0.05, 0.2, 0.8]} and (folder / "frontier.png").stat().st_size > 10_000
    finals = record["frontier"]["finals"]
    assert record["frontier"]["reward_key"] == "behaviour" and record["frontier"]["kl_key"] == "kl/sampled"
    assert all(p["step"] == 4 and p["kl"] is not None and p["reward"] is not None for p in finals)
    assert sum(p["pareto"] for p in finals) >= 1 and record["frontier"]["why"]
    # the evaluations along training (step 2) are points too, one per run
    assert sorted(p["name"] for p in record["frontier"]["along"]) == ["beta-0.05", "beta-0.2", "beta-0.8"]


def test_a_finished_point_of_another_recipe_is_refused_by_name(here):
    grid = parse_grid(["loss.beta=0.1"])
    run_sweep("toy", SMALL, grid)
    with pytest.raises(ConfigError, match="sweep point beta-0.1: .* differs in train.lr"):
        run_sweep("toy", [*SMALL, "train.lr=1e-3"], grid)
    # a longer sweep is not this one: its runs would be compared with the shorter one's
    with pytest.raises(ConfigError, match="differs in train.max_steps; a sweep compares runs trained the same way"):
        run_sweep("toy", [*SMALL, "train.max_steps=6"], grid)


def _front(points, reference=0.5) -> Frontier:
    finals = [Point(name, 10, reward, kl) for name, kl, reward in points]
    mark_pareto(finals, reference)
    return Frontier("behaviour", "kl/sampled", reference, finals)


def test_the_frontier_keeps_the_non_dominated_points_and_recommends_the_knee():
    front = _front([("a", 0.1, 0.60), ("b", 0.2, 0.70), ("c", 0.3, 0.65), ("d", 0.2, 0.70 - 1e-9)])
    assert [p.name for p in front.finals if p.pareto] == ["a", "b"]  # c: more KL, less reward than b; d: than b
    name, why = recommend(front)
    assert name == "b" and why.startswith("b: the highest behaviour score")  # a keeps 50% of the gain: not enough
    front = _front([("a", 0.1, 0.69), ("b", 0.2, 0.70)])
    name, why = recommend(front)  # a keeps (0.69 - 0.5) / (0.70 - 0.5) = 95% of the gain at half the KL
    assert name == "a" and "95% of the best gain" in why and "50% of its KL" in why
    name, why = recommend(_front([("a", 0.1, 0.49), ("b", 0.2, 0.50)]))
    assert name is None and "no point improved on the reference" in why
    worse = _front([("a", 0.1, 0.45), ("b", 0.2, 0.70)])  # a: more KL than the reference, less reward
    assert [p.name for p in worse.finals if p.pareto] == ["b"]
