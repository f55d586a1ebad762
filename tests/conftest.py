"""Options of the test suite."""


def pytest_addoption(parser):
    parser.addoption("--exact-pins", action="store_true", default=False,
                     help="tests/test_regression.py: every pinned figure bit for bit (the machine and torch "
                          "that wrote them), not within its tolerance")
