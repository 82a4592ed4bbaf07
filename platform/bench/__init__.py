"""Benchmarks that print a ratio against a baseline measured in the same run: the network, the data pipeline, the
training loop, the compute options, and large images through the replica's request path (``large_images``: peak
memory per image size against the 1024x1024 one's). (The serving benchmark lives in ``datprl.serve.benchmark``: it
drives the deployed HTTP app, so it stays next to what it measures.)"""
