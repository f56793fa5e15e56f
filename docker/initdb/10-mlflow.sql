-- MLflow's tracking tables live in their own database beside the Optuna one.
CREATE DATABASE mlflow;
