import os


def shout(text: str) -> str:
    # where this module was imported from, so a test can tell a shipped copy from the original
    return f"{text.upper()}! (from {os.path.dirname(os.path.abspath(__file__))})"
