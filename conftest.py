"""Root conftest: plumbing only. The suite's plugins live in fixtures/, its logic in pdperf/."""

pytest_plugins = ["fixtures.options", "fixtures.session", "fixtures.reporting", "fixtures.ordering",
                  "fixtures.logstreams", "fixtures.leaks"]
