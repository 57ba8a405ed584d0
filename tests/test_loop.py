"""What the loop does after each optimizer step (`loop.plan`), checked without training."""

import pytest

from toolkit import config
from toolkit.loop import Plan, plan
from toolkit.run.summary import Stop


def cfg(*overrides):
    return config.resolve({}, [], ["epochs=3", "log_every=50", *overrides])


def run(cfg, steps_per_epoch=32, requests=None, bad_steps=None):
    """Every step's plan, as the loop asks for it, until one stops: {step: (epoch, Plan)}. A
    validation is assumed to find no new best and no reason to stop."""
    requests, bad_steps, plans, step = requests or {}, bad_steps or {}, {}, 0
    for epoch in range(1, cfg.epochs + 1):
        for batch in range(1, steps_per_epoch + 1):
            step += 1
            plans[step] = epoch, plan(step, epoch, batch == steps_per_epoch, cfg, requests.get(step),
                                      bad_steps.get(step, 0))
            if plans[step][1].stop:
                return plans
    return plans


def steps(plans, what):
    return [step for step, (_, todo) in plans.items() if getattr(todo, what)]


def test_validation_every_n_steps_and_every_n_epochs():
    """Every 20 steps mid-epoch; at the end of every 2nd epoch (64, not 32); and at the end (96)."""
    assert steps(run(cfg("val_every=2", "val_every_steps=20")), "validate") == [20, 40, 60, 64, 80, 96]
    assert steps(run(cfg()), "validate") == [32, 64, 96]  # the default: every epoch
    assert steps(run(cfg("val_every=0")), "validate") == [96]  # only at the end


def test_saves_on_schedule_and_at_the_end():
    assert steps(run(cfg()), "save") == [32, 64, 96]
    assert steps(run(cfg("checkpoint.every_epochs=2", "checkpoint.every_steps=25")), "save") == [25, 50, 64, 75, 96]
    assert steps(run(cfg("checkpoint.every_epochs=0")), "save") == [96]  # the last is always saved


def test_logs_every_n_steps_whatever_else_a_step_does_and_at_the_end():
    """Windows of log_every steps, not cut by validations, saves or epochs (32 steps each)."""
    plans = run(cfg("log_every=10", "val_every_steps=15", "checkpoint.every_steps=12"))
    assert steps(plans, "log") == [*range(10, 91, 10), 96]
    assert steps(run(cfg("log_every=10", "max_steps=45")), "log") == [10, 20, 30, 40, 45]


def test_a_stop_for_good_logs_its_last_window_and_a_signal_s_stop_does_not():
    """A signal's checkpoint keeps the window instead: the resumed run goes on with it."""
    assert run(cfg(), requests={7: Stop.MAX_MINUTES})[7][1].log
    assert run(cfg("nan_tolerance=3"), bad_steps={7: 4})[7][1].log
    assert not run(cfg(), requests={7: Stop.SIGTERM})[7][1].log


@pytest.mark.parametrize("max_steps", [40, 64])
@pytest.mark.parametrize("val_every", [1, 0])
def test_max_steps_ends_the_run_with_a_validation_and_a_save(max_steps, val_every):
    """Mid-epoch or at an epoch's end, the run's last step validates and saves (val_every=0: only then)."""
    plans = run(cfg(f"max_steps={max_steps}", f"val_every={val_every}"))
    assert max(plans) == max_steps and plans[max_steps][1].stop == Stop.MAX_STEPS
    assert steps(plans, "save") == [32, max_steps]
    assert steps(plans, "validate") == ([32] if val_every and max_steps > 32 else []) + [max_steps]


@pytest.mark.parametrize("request_", [Stop.SIGTERM, Stop.SIGINT])
def test_a_signal_stops_at_that_step_with_a_checkpoint(request_):
    plans = run(cfg(), requests={7: request_})
    assert max(plans) == 7
    assert plans[7] == (1, Plan(log=False, validate=False, save=True, stop=request_))


def test_max_minutes_mid_epoch_ends_the_run_with_a_validation_and_a_save():
    assert run(cfg(), requests={7: Stop.MAX_MINUTES})[7] == (1, Plan(log=True, validate=True, save=True,
                                                                      stop=Stop.MAX_MINUTES))


def test_max_minutes_at_an_epoch_end_validates_as_the_last_epoch():
    every_2 = cfg("val_every=2")
    assert run(every_2, requests={32: Stop.MAX_MINUTES})[32] == (1, Plan(True, True, True, Stop.MAX_MINUTES))
    assert run(every_2, requests={32: Stop.SIGTERM})[32] == (1, Plan(False, False, True, Stop.SIGTERM))


def test_non_finite_steps_stop_past_the_tolerance():
    bad = {5: 1, 6: 2, 7: 3, 8: 4}  # four steps in a row skipped; nan_tolerance=3
    plans = run(cfg("nan_tolerance=3"), bad_steps=bad)
    assert max(plans) == 8 and plans[8][1].stop == Stop.NAN and plans[8][1].save
    assert [plans[s][1].stop for s in range(1, 8)] == [None] * 7


def test_a_signal_wins_over_max_steps_and_nan():
    assert plan(10, 1, False, cfg("max_steps=10"), Stop.SIGTERM, bad_steps=9).stop == Stop.SIGTERM
    assert plan(10, 1, False, cfg("max_steps=10"), None, bad_steps=9).stop == Stop.MAX_STEPS
