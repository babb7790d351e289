"""The encrypted object repository: S3, authenticated encryption, keys, objects and the backup catalog."""
