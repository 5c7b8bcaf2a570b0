"""A script run as ``__main__`` with ``with app.run():`` (tests/integration/test_apps.py)."""

import sys

import strato

app = strato.App("strato-test-script")


@app.function()
def greet(name: str) -> str:
    print(f"greeting {name} from the container", flush=True)
    return f"hello {name}"


if __name__ == "__main__":
    with app.run():
        print("RESULT", greet.remote(sys.argv[1]), flush=True)
        print("MAP", ",".join(greet.map(["a", "b", "c"])), flush=True)
