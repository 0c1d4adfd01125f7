"""Hypothesis profiles: `ci` (default, >= 200 examples for stateful safety tests) and `thorough`.

Select with `pytest --hypothesis-profile=thorough`.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile(
    "thorough", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("ci")
