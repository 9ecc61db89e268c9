"""Hypothesis profiles: a quick default, a thorough one by GIMLI_PROFILE=thorough."""

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               derandomize=True)
settings.register_profile("quick", max_examples=25, **_common)
settings.register_profile("thorough", max_examples=300, **{**_common, "derandomize": False})
settings.load_profile(os.environ.get("GIMLI_PROFILE", "quick"))
