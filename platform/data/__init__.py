"""The multi-domain dataset: its format (records, manifest, images), shards, source images, degradation synthesis,
the dataset builder, training transforms, the task-balanced sampler and the Ray Data pipeline."""
