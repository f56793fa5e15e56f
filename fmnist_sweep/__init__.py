"""fmnist-sweep: Hydra-composed, Optuna-driven, MLflow-recorded Fashion-MNIST training."""

__version__ = "0.1.0"
