"""A function whose named secret the test deletes before its first container starts."""

import os

import strato

app = strato.App("strato-test-secrets-deleted")


@app.function(secrets=[strato.Secret.from_name("itest-temp")])
def has_temp() -> bool:
    return "ITEST_TEMP" in os.environ
