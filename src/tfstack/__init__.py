"""tfstack: stack pretrained Keras models and train them by freeze policy and schedule."""

__version__ = "0.1.0"
