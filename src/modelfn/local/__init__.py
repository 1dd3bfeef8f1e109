"""Docker-free stand-ins for API Gateway and S3 → SQS events: thin adapters that
run the deployed handlers unchanged."""
