"""Production deployment: the Dagster instance file, the Kubernetes executor example and the
pod specification of GPU training pods launched through Dagster Pipes."""

from kad_pipeline.deploy.pods import (
    SecretEnv,
    TrainingPodSettings,
    build_training_pod_spec,
    training_command,
)

__all__ = ["SecretEnv", "TrainingPodSettings", "build_training_pod_spec", "training_command"]
