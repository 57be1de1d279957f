"""The generation engine: Wan2.1 I2V over diffusers components and torch.

Imports nothing of ours and knows nothing of Kafka or MinIO.
"""
