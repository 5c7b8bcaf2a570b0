"""Functions and a class with secrets, and a function without (tests/integration/
test_secrets.py). The values come from the test's environment when it imports this
module; the functions return digests of what they see, never the values (a result is
stored, and the test searches the store for the values)."""

import hashlib
import os

import strato

KEYS = ("ITEST_NAMED", "ITEST_DICT", "ITEST_LOCAL")
app = strato.App("strato-test-secrets")


def seen() -> dict:
    return {
        k: hashlib.sha256(os.environ[k].encode()).hexdigest() if k in os.environ else None
        for k in KEYS
    }


@app.function(
    secrets=[
        strato.Secret.from_name("itest-named"),
        strato.Secret.from_dict({"ITEST_DICT": os.environ.get("ITEST_DICT_VALUE", "")}),
        strato.Secret.from_local_environ(["ITEST_LOCAL"]),
    ]
)
def with_secrets() -> dict:
    return seen()


@app.function()
def without_secrets() -> dict:
    return seen()


@app.cls(secrets=[strato.Secret.from_name("itest-named")])
class WithSecret:
    @strato.method()
    def look(self) -> dict:
        return seen()
