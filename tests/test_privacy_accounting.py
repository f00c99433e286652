import math
import subprocess
import sys

import pytest
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from lightning_dp.privacy import PrivacyAccountant, calibrate_noise_multiplier, default_delta, validate_privacy_args


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibration_is_opacus_get_noise_multiplier(accountant):
    kw = dict(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.01, steps=500)
    expected = get_noise_multiplier(accountant=accountant, epsilon_tolerance=0.01, **kw)
    got = calibrate_noise_multiplier(3.0, 1e-5, 0.01, 500, accountant)
    assert got == pytest.approx(expected, rel=0, abs=0)
    # and that σ indeed spends at most the target, and not much less
    acc = PrivacyAccountant(accountant)
    acc.step(got, 0.01, 500)
    assert 3.0 - 0.05 <= acc.epsilon(1e-5) <= 3.0


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_is_opacus_accountant_on_same_history(accountant):
    acc = PrivacyAccountant(accountant)
    ref = create_accountant(accountant)
    for _ in range(40):
        acc.step(1.1, 0.02)
        ref.step(noise_multiplier=1.1, sample_rate=0.02)
    acc.step(0.9, 0.05, num_steps=3)
    for _ in range(3):
        ref.step(noise_multiplier=0.9, sample_rate=0.05)
    assert acc.steps == 43
    assert acc.epsilon(1e-5) == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)
    assert PrivacyAccountant(accountant).epsilon(1e-5) == 0.0


def test_epsilon_grows_and_state_round_trips():
    acc = PrivacyAccountant("rdp")
    acc.step(1.0, 0.1, 10)
    e10 = acc.epsilon(1e-5)
    assert acc.epsilon(1e-5, extra=(1.0, 0.1, 10)) > e10
    clone = PrivacyAccountant("rdp")
    clone.load_state_dict(acc.state_dict())
    assert clone.epsilon(1e-5) == e10 and clone.steps == 10
    with pytest.raises(ValueError, match="accounted with 'rdp'"):
        PrivacyAccountant("prv").load_state_dict(acc.state_dict())


def test_max_steps_within_is_tight():
    acc = PrivacyAccountant("rdp")
    k = acc.max_steps_within(2.0, 1e-5, 1.0, 0.05)
    assert k > 0
    assert acc.epsilon(1e-5, (1.0, 0.05, k)) <= 2.0 < acc.epsilon(1e-5, (1.0, 0.05, k + 1))


def test_zero_noise_is_infinite_epsilon():
    acc = PrivacyAccountant("rdp")
    acc.step(0.0, 0.1)
    assert math.isinf(acc.epsilon(1e-5))


def test_default_delta():
    assert default_delta(1000) == pytest.approx(1000**-1.1)
    assert default_delta(67349) < 1 / 67349


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps=None, delta=None, noise_multiplier=None), "exactly one"),
        (dict(eps=3.0, delta=None, noise_multiplier=1.0), "exactly one"),
        (dict(eps=0.0, delta=None, noise_multiplier=None), "eps"),
        (dict(eps=-1.0, delta=None, noise_multiplier=None), "eps"),
        (dict(eps=float("inf"), delta=None, noise_multiplier=None), "eps"),
        (dict(eps=3.0, delta=0.0, noise_multiplier=None), "delta"),
        (dict(eps=3.0, delta=1.0, noise_multiplier=None), "delta"),
        (dict(eps=None, delta=None, noise_multiplier=-0.5), "noise_multiplier"),
    ],
)
def test_invalid_privacy_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        validate_privacy_args(accountant="prv", **kwargs)
    with pytest.raises(ValueError, match="accountant"):
        validate_privacy_args(3.0, None, None, "gdp")


def test_import_is_lazy():
    code = "import sys, lightning_dp; assert 'opacus' not in sys.modules, 'opacus imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)
