"""The repository's own test run: examples/userproject is a project of its
own, run as its user would (``cd examples/userproject && pytest``) by
tests/vmm/testing/test_userproject.py, not collected from here."""

collect_ignore = ["userproject"]
