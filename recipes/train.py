"""Train a zoo model from a YAML recipe; the loop lives in zoo.training.

accelerate launch recipes/train.py recipes/configs/tiny-tnl.yaml [key=value ...]
accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/train.py RECIPE
python recipes/train.py RECIPE --dry-run
"""

from zoo.training import main

if __name__ == "__main__":
    main()
