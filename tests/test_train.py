"""Training, resuming, checkpoints and their errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

import pixelchain as pc
from pixelchain.run_dir import STATE

DROPOUT_MODEL = ("pixelcnn_pp", {"channels": 4, "num_resnet": 1, "num_scales": 2, "num_mixtures": 2, "dropout": 0.3})


@pytest.fixture(scope="module")
def digits():
    train = pc.data.load("digits", "train").subset(slice(0, 200))
    valid = pc.data.load("digits", "valid").subset(slice(0, 60))
    return train, valid


def new_model(digits, name=DROPOUT_MODEL[0], hparams=DROPOUT_MODEL[1]):
    torch.manual_seed(0)
    return pc.create(name, digits[0].image_shape, digits[0].num_levels, **hparams)


def weights(run_dir):
    return {k: v for k, v in load_file(str(run_dir / STATE)).items() if k.startswith("model.")}


def test_resume_with_evaluations_inside_epochs(digits, tmp_path):
    """eval_every adds mid-epoch evaluations; an interrupted run still ends like an uninterrupted one."""
    train, valid = digits
    kwargs = dict(epochs=2, batch_size=16, lr=3e-3, eval_every=5, progress=False)  # 13 batches per epoch
    pc.fit(new_model(digits), train, valid, run_dir=tmp_path / "a", **kwargs)
    pc.fit(new_model(digits), train, valid, run_dir=tmp_path / "b", max_steps=12, **kwargs)
    pc.fit(new_model(digits), train, valid, run_dir=tmp_path / "b", resume=True, **kwargs)
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 13, 15, 20, 25, 26]
    assert records[0]["epoch"] == pytest.approx(5 / 13, abs=1e-4) and records[2]["epoch"] == 1
    log_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "time"} for x in lines]  # noqa: E731
    assert strip(log_b) == strip([json.dumps(r) for r in records])
    for key, value in weights(tmp_path / "a").items():
        torch.testing.assert_close(weights(tmp_path / "b")[key], value, rtol=0, atol=0, msg=key)


def test_a_budget_spent_before_the_first_evaluation_leaves_a_loadable_model(digits, tmp_path):
    """max_steps inside the first epoch: no evaluation yet, but the run directory holds the weights
    fit returns, so the run loads (and a resume still selects by validation)."""
    train, valid = digits
    model = new_model(digits, "fully_visible", {})
    summary = pc.fit(model, train, valid, run_dir=tmp_path / "run", epochs=2, batch_size=20, max_steps=3,
                     progress=False)
    assert summary["step"] == 3 and summary["best_valid"] is None
    loaded = pc.load(tmp_path / "run")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    pc.fit(model, train, valid, run_dir=tmp_path / "run", epochs=2, batch_size=20, resume=True, progress=False)
    assert pc.evaluate(pc.load(tmp_path / "run"), valid)["nll"] == pytest.approx(
        min(json.loads(x)["valid_nll"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()),
        rel=1e-6)


def test_killed_between_logging_and_checkpointing_logs_each_evaluation_once(digits, tmp_path, monkeypatch):
    """A kill after an evaluation is logged but before its checkpoint: resuming redoes it, once."""
    train, valid = digits
    kwargs = dict(epochs=3, batch_size=16, checkpoint_seconds=0, progress=False)
    real_save = pc.train._save_state

    class Killed(Exception):
        pass

    def save_then_die_after_epoch_1(path, model, optimizer, state, *average):
        if state.epoch == 1 and state.batch == 0:  # the checkpoint that follows epoch 1's log line
            raise Killed
        real_save(path, model, optimizer, state, *average)

    monkeypatch.setattr(pc.train, "_save_state", save_then_die_after_epoch_1)
    with pytest.raises(Killed):
        pc.fit(new_model(digits), train, valid, run_dir=tmp_path / "run", **kwargs)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    monkeypatch.setattr(pc.train, "_save_state", real_save)
    pc.fit(new_model(digits), train, valid, run_dir=tmp_path / "run", resume=True, **kwargs)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]


def test_polyak_average_is_what_trains_resumes_and_is_returned(digits, tmp_path):
    """With ema, the trainer keeps a_{n+1} = d_n a_n + (1 - d_n) w_{n+1} (d_n = min(ema, (1+n)/(10+n)),
    a_0 the initial weights) beside the raw weights w_n, carries it across a resume, and the model
    it returns (no validation set) is the average, not the last raw weights."""
    train, _ = digits
    kwargs = dict(epochs=5, batch_size=50, lr=3e-2, ema=0.5, checkpoint_seconds=0, progress=False)
    model = new_model(digits, "fully_visible", {})
    raw = [{k: v.clone() for k, v in model.state_dict().items()}]
    for step in range(1, 7):  # one step per call, resumed each time
        pc.fit(model, train, run_dir=tmp_path / "run", resume=step > 1, max_steps=step, **kwargs)
        raw.append({k[6:]: v for k, v in weights(tmp_path / "run").items()})
    average = dict(raw[0])
    for n, w in enumerate(raw[1:]):
        d = min(0.5, (1 + n) / (10 + n))
        average = {k: d * average[k] + (1 - d) * w[k] for k in average}
    saved = {k[4:]: v for k, v in load_file(str(tmp_path / "run" / STATE)).items() if k.startswith("ema.")}
    assert saved.keys() == average.keys()
    for k in average:
        torch.testing.assert_close(saved[k], average[k])
        torch.testing.assert_close(model.state_dict()[k], average[k])  # fit returns the average
    assert any(not torch.allclose(raw[-1][k], average[k]) for k in average)  # which is not the raw weights
    # the same six steps in one call: the same average
    once = new_model(digits, "fully_visible", {})
    pc.fit(once, train, run_dir=tmp_path / "once", max_steps=6, **kwargs)
    for k in average:
        torch.testing.assert_close(once.state_dict()[k], average[k])


def test_polyak_average_is_what_validation_selects(digits, tmp_path):
    """With a validation set, each evaluation scores the average and the best average is saved."""
    train, valid = digits
    model = new_model(digits, "fully_visible", {})
    pc.fit(model, train, valid, run_dir=tmp_path / "run", epochs=2, batch_size=50, lr=3e-2, ema=0.9, progress=False)
    best = min(json.loads(x)["valid_nll"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert pc.evaluate(pc.load(tmp_path / "run"), valid)["nll"] == pytest.approx(best, rel=1e-6)
    assert pc.evaluate(model, valid)["nll"] == pytest.approx(best, rel=1e-6)
    state = load_file(str(tmp_path / "run" / STATE))
    raw = new_model(digits, "fully_visible", {})
    raw.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    average = new_model(digits, "fully_visible", {})
    average.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("ema.")})
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["valid_nll"]
    assert pc.evaluate(average, valid)["nll"] == pytest.approx(last, rel=1e-6)  # the average was scored
    assert pc.evaluate(raw, valid)["nll"] != pytest.approx(last, rel=1e-6)  # not the raw weights


def test_fit_improves_the_likelihood(digits, tmp_path):
    train, valid = digits
    model = new_model(digits, "fully_visible", {})
    before = pc.evaluate(model, valid)["nll"]
    summary = pc.fit(model, train, valid, run_dir=tmp_path / "run", epochs=3, batch_size=20, progress=False)
    after = pc.evaluate(model, valid)["nll"]
    assert summary["finished"] and summary["epoch"] == 3 and summary["step"] == 30
    assert after < before - 10
    assert after == pytest.approx(summary["best_valid"], rel=1e-6)  # the model holds its best weights
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert {"valid_nll", "valid_bits_per_dim", "train_nll", "step", "time"} <= set(records[0])


def test_resume_mid_epoch_ends_where_an_uninterrupted_run_ends(digits, tmp_path):
    """Stop after 13 steps (inside epoch 2, model with dropout), resume: same weights, same log."""
    train, valid = digits
    kwargs = dict(epochs=3, batch_size=16, lr=3e-3, progress=False)  # 13 batches per epoch
    pc.fit(new_model(digits), train, valid, run_dir=tmp_path / "a", **kwargs)

    first = pc.fit(new_model(digits), train, valid, run_dir=tmp_path / "b", max_steps=20, **kwargs)
    assert not first["finished"] and first["step"] == 20 and first["epoch"] == 1
    second = pc.fit(new_model(digits), train, valid, run_dir=tmp_path / "b", resume=True, **kwargs)
    assert second["finished"] and second["step"] == 39
    for key, value in weights(tmp_path / "a").items():
        torch.testing.assert_close(weights(tmp_path / "b")[key], value, rtol=0, atol=0, msg=key)
    log_a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    log_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "time"} for x in lines]  # noqa: E731
    assert strip(log_a) == strip(log_b)


def test_refuses_to_overwrite_or_resume_nothing(digits, tmp_path):
    train, valid = digits
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        pc.fit(new_model(digits), train, valid, run_dir=tmp_path / "new", resume=True, progress=False)
    pc.fit(new_model(digits), train, valid, run_dir=tmp_path / "run", max_steps=1, progress=False)
    with pytest.raises(FileExistsError, match="already holds a model"):
        pc.fit(new_model(digits), train, valid, run_dir=tmp_path / "run", progress=False)


def test_a_saved_model_is_never_replaced_unless_asked(digits, tmp_path):
    train, valid = digits
    saved = pc.save(new_model(digits), tmp_path / "saved")  # no trainer state: pc.save's folder
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    with pytest.raises(FileExistsError, match="already holds a model"):
        pc.fit(new_model(digits), train, valid, run_dir=saved, max_steps=1, progress=False)
    assert {p.name: p.read_bytes() for p in saved.iterdir() if p.name != ".lock"} == before
    pc.fit(new_model(digits), train, valid, run_dir=saved, epochs=1, progress=False, overwrite=True)
    assert (saved / "trainer_state.safetensors").is_file()
    assert (saved / "model.safetensors").read_bytes() != before["model.safetensors"]


def test_nan_loss_stops_with_a_clear_error_and_an_intact_checkpoint(digits, tmp_path):
    train, valid = digits
    model = new_model(digits, "fully_visible", {})
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += module.training  # training steps only, not the validation passes
        return output * float("nan") if module.training and calls["n"] == 6 else output

    model.register_forward_hook(poison)
    with pytest.raises(pc.TrainingDiverged, match="step 6") as error:
        pc.fit(model, train, valid, run_dir=tmp_path / "run", checkpoint_seconds=0, progress=False)
    assert "intact" in str(error.value) and "resume" in str(error.value)
    saved = weights(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in saved.values())
    state = pc.train._load_state(tmp_path / "run" / STATE, new_model(digits, "fully_visible", {}),
                                 torch.optim.Adam(model.parameters()))
    assert state.step == 5


def test_dataset_must_match_the_model(digits):
    model = pc.create("fvsbn", (1, 8, 8), 2)
    with pytest.raises(ValueError, match="17 levels"):
        pc.fit(model, digits[0], progress=False)


def test_logistic_regression_learns_digits(tmp_path):
    """Maximum likelihood (cross-entropy) fits the classifier: chance is 10%. The digits test split
    (the file's last 270, other writers) is harder than the validation split."""
    train, valid, test = (pc.data.load("digits", s) for s in ("train", "valid", "test"))
    torch.manual_seed(0)
    model = pc.classifiers.create("logistic_regression", train.image_shape, train.num_levels, num_classes=10)
    pc.fit(model, train, epochs=40, batch_size=32, lr=0.01, progress=False)
    assert pc.evaluate(model, valid)["accuracy"] > 0.93
    assert pc.evaluate(model, test)["accuracy"] > 0.85
    probs = model(test.images[:1]).softmax(-1)[0]
    draws = torch.stack([model.sample(test.images[:1], torch.Generator().manual_seed(i)) for i in range(400)])
    assert abs((draws == probs.argmax()).double().mean().item() - probs.max().item()) < 0.08


def test_save_load_round_trip_and_errors(digits, tmp_path):
    model = new_model(digits).eval()
    pc.save(model, tmp_path / "run", dataset={"name": "digits"})
    loaded = pc.load(tmp_path / "run").eval()
    x = digits[1].images[:5]
    torch.testing.assert_close(loaded.log_prob(x), model.log_prob(x))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"] == "pixelcnn_pp"

    with pytest.raises(FileNotFoundError, match="no config.json"):
        pc.load(tmp_path / "missing")
    (tmp_path / "run" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        pc.load(tmp_path / "run")
    (tmp_path / "run" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        pc.load(tmp_path / "run")


def test_weight_decay_shrinks_weights_not_biases():
    model = pc.create("fvsbn", (1, 2, 2), 2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    optimizer = pc.train.adam(model, lr=0.1, weight_decay=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # only the penalty moves anything
    optimizer.step()
    assert (model.linear.weight < 1).all()
    assert (model.linear.bias == 1).all()
    assert all(group["fused"] for group in optimizer.param_groups)  # CPU float parameters


def test_a_penalty_is_added_to_the_objective_and_left_out_of_the_logged_nll(digits, tmp_path):
    """penalty(model) = weight_decay's L2 term trains the same weights; the logged NLL excludes it."""
    train, valid = digits

    def run(name, **kwargs):
        torch.manual_seed(0)
        model = pc.create("fully_visible", train.image_shape, train.num_levels)
        pc.fit(model, train, valid, run_dir=tmp_path / name, epochs=1, batch_size=50, lr=1e-2, progress=False, **kwargs)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return model, [json.loads(line)["train_nll"] for line in lines]

    def l2(model):
        return 0.5 * 0.3 * model.linear.weight.pow(2).sum()

    decayed, _ = run("decay", weight_decay=0.3)
    penalised, logged = run("penalty", penalty=l2)
    torch.testing.assert_close(penalised.linear.weight, decayed.linear.weight, rtol=1e-4, atol=1e-5)
    assert penalised.linear.weight.abs().max() > 0
    assert json.loads((tmp_path / "penalty" / "config.json").read_text())["train"]["penalty"] == "l2"
    _, logged_shifted = run("shifted", penalty=lambda model: l2(model) + 1e3)  # same gradients
    assert logged_shifted == pytest.approx(logged)


def test_a_run_continues_from_weights_and_a_position(digits, tmp_path):
    """write_trainer_state makes a weights-only checkpoint resumable: fit picks up its epoch, step,
    time and learning rate, with fresh optimiser moments, and keeps its record."""
    from pixelchain.train import write_trainer_state

    train, valid = digits
    kwargs = dict(batch_size=16, lr=3e-3, lr_decay=0.5, progress=False)  # 13 batches per epoch
    first = new_model(digits)
    pc.fit(first, train, valid, run_dir=tmp_path / "a", epochs=2, **kwargs)
    shipped = pc.save(first, tmp_path / "shipped")  # weights and config only, as a shipped checkpoint

    continued = pc.load(shipped)
    with pytest.raises(ValueError, match="unknown trainer position"):
        write_trainer_state(tmp_path / "b", continued, lr=1.0, epochs=2)
    write_trainer_state(tmp_path / "b", continued, lr=3e-3 * 0.5**2, step=26, epoch=2, elapsed=5.0, best_valid=1e9)
    summary = pc.fit(continued, train, valid, run_dir=tmp_path / "b", epochs=3, resume=True, **kwargs)
    assert (summary["epoch"], summary["step"]) == (3, 39)
    assert summary["elapsed"] > 5.0
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in records] == [(39, 3)]
    assert records[0]["lr"] == pytest.approx(3e-3 * 0.5**3)
    assert records[0]["valid_nll"] < 1e9 and summary["best_valid"] == records[0]["valid_nll"]


def test_warmup_ramps_the_rate_whenever_adams_moments_start_fresh(digits, tmp_path):
    """Adam's first update moves every parameter whose gradient is nonzero by about lr (m/sqrt(v) is
    the gradient's sign); with warmup=4 it moves by lr/4, both in a new run and in a run continued
    from weights without moments, while a resume that keeps its moments takes full steps and the
    schedule's recorded rate is untouched."""
    from pixelchain.train import write_trainer_state

    train, valid = digits
    lr, kwargs = 1e-2, dict(batch_size=16, epochs=1, progress=False)

    def largest_move(run_dir, resume, warmup, steps):
        model = pc.load(run_dir) if resume else new_model(digits, "fully_visible", {})
        before = {k[6:]: v for k, v in weights(run_dir).items()} if resume else \
            {k: v.clone() for k, v in model.state_dict().items()}
        pc.fit(model, train, None, run_dir=run_dir, resume=resume, lr=lr, warmup=warmup, max_steps=steps, **kwargs)
        after = {k[6:]: v for k, v in weights(run_dir).items()}
        return max((after[k] - v).abs().max().item() for k, v in before.items())

    assert largest_move(tmp_path / "full", False, 0, 1) == pytest.approx(lr, rel=1e-3)
    assert largest_move(tmp_path / "warm", False, 4, 1) == pytest.approx(lr / 4, rel=1e-3)
    # continued from weights and a position: the moments are fresh, so the ramp starts again
    pc.save(pc.load(tmp_path / "full"), tmp_path / "cont")
    write_trainer_state(tmp_path / "cont", pc.load(tmp_path / "cont"), lr=lr, step=7)
    assert largest_move(tmp_path / "cont", True, 4, 8) == pytest.approx(lr / 4, rel=1e-3)
    # resumed with its moments at step 8: two more ramp steps (3/4 of the rate), never above lr
    assert 0 < largest_move(tmp_path / "cont", True, 4, 9) <= lr * 3 / 4 * 1.01
    from pixelchain.run_dir import RunDir

    assert RunDir(tmp_path / "cont").read_state()[1]["param_groups"][0]["lr"] == pytest.approx(lr)
