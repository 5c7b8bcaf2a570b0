"""A function naming a secret that does not exist: the app is refused."""

import strato

app = strato.App("strato-test-secrets-unknown")


@app.function(secrets=[strato.Secret.from_name("itest-no-such-secret")])
def f() -> int:
    return 1
