"""An S3-compatible object store client: AWS Signature V4 over httpx (no AWS SDK)."""
