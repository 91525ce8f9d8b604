"""`python -m services.playground`: the browser playground on LIVESTAGE_PLAYGROUND_PORT."""

from livestage.playground import run_playground

if __name__ == "__main__":
    run_playground()
