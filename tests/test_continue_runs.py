"""benchmarks/continue_runs.py: the training queue's bookkeeping (its training is pc.fit's)."""

import shutil

import pixelchain as pc
from benchmarks import continue_runs
from pixelchain.checkpoint import PRETRAINED_DIR
from pixelchain.run_dir import RunDir, result_record
from pixelchain.train import STATE, _load_state


def test_every_job_names_a_shipped_checkpoint_and_its_figure():
    for job in continue_runs.JOBS:
        value, unfinished = continue_runs.status(job)
        assert (PRETRAINED_DIR / job.name / "model.safetensors").is_file()
        finished = RunDir(PRETRAINED_DIR / job.name).read_result()["finished"]
        assert unfinished == (not job.reached(value) and not finished)
    accuracy, nll = continue_runs.Job("a", "accuracy", 0.9, "t"), continue_runs.Job("b", "nll", 80.0, "t")
    assert accuracy.reached(0.91) and not accuracy.reached(0.89) and nll.reached(79.9) and not nll.reached(80.1)


def test_a_shipped_run_continues_from_its_weights_and_position(tmp_path, monkeypatch):
    train, valid = pc.data.load("digits", "train"), pc.data.load("digits", "valid")
    model = pc.create("fully_visible", train.image_shape, train.num_levels)
    options = dict(epochs=1, batch_size=64, lr=3e-3, lr_decay=0.5)
    summary = pc.fit(model, train, valid, run_dir=tmp_path / "first", progress=False,
                     info={"dataset": {"name": "digits"}}, **options)
    shipped = tmp_path / "checkpoints" / "tiny"
    shipped.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tmp_path / "first" / name, shipped / name)
    RunDir(shipped).write_result(result_record(model, summary, pc.evaluate(model, valid)))
    monkeypatch.setattr(continue_runs, "PRETRAINED_DIR", tmp_path / "checkpoints")

    run_dir = tmp_path / "continued"
    continue_runs.seed_from_shipped(continue_runs.Job("tiny", "nll", 0.0, "none"), run_dir)
    state = _load_state(run_dir / STATE, pc.create("fully_visible", train.image_shape, train.num_levels),
                        pc.train.adam(model, 1.0))
    assert (state.step, state.epoch, state.batch) == (summary["step"], 1, 0)
    assert state.best_valid == summary["best_valid"] and state.elapsed == summary["elapsed"]
    again = pc.create("fully_visible", train.image_shape, train.num_levels)
    resumed = pc.fit(again, train, valid, run_dir=run_dir, resume=True, progress=False, **{**options, "epochs": 2})
    assert resumed["epoch"] == 2 and resumed["step"] == 2 * summary["step"]
    # a job's own arguments (Polyak averaging) reach its training calls, after the queue's
    job = continue_runs.Job("tiny", "nll", 0.0, "none", extra=("--ema", "0.9995"))
    command = continue_runs.command(job, tmp_path / "runs", 5.0, False)
    assert command[command.index("--resume"):][-2:] == ["--ema", "0.9995"]
    assert (tmp_path / "runs" / "tiny" / STATE).is_file()
