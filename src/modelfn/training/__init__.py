"""Training: data, models and the training job (torch; never shipped to Lambda)."""
