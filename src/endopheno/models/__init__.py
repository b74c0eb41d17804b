"""Deep models that turn MNI volumes into imaging endophenotypes: architectures, honest cross-validated
training tracked in MLflow, the model registry, and extraction into the feature store."""
