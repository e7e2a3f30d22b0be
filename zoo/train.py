"""`python -m zoo.train RECIPE [key=value ...]`: the packaged training entry point, so that
`accelerate launch -m zoo.train RECIPE` trains from any directory (the loop: `zoo.training`)."""

from zoo.training import main

if __name__ == "__main__":
    main()
