"""Hypothesis profiles: `ci` (default, >= 200 examples for stateful safety tests) and `thorough`.

`ci` is derandomized: the same examples on every run, so CI's verdict on a commit is reproducible on any machine
and a landing never depends on luck. Exploration with fresh random examples is `thorough` (2000 examples, random
seed), run before each release and whenever the core changes:
`pytest tests/core --hypothesis-profile=thorough` (see README, "Tests").
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=200,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "thorough", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("ci")
