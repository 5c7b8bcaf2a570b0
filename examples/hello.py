"""The hello-world of strato: `strato run examples/hello.py`."""

import strato

app = strato.App("hello")


@app.function(cpu=0.5, memory=256, timeout=60, retries=2)
def square(x: int) -> int:
    print(f"squaring {x}")
    return x * x


@app.local_entrypoint()
def main():
    print(square.remote(7))
    print(sum(square.map(range(1000))))
    call = square.spawn(3)
    print(call.get(timeout=10))


if __name__ == "__main__":
    with app.run():
        main()
