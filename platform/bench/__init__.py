"""Benchmarks that print a ratio against a baseline measured in the same run: the network, the data pipeline and the
training loop. (The serving benchmark lives in ``datprl.serve.benchmark``: it drives the deployed HTTP app and shares
the serving package's sample helpers, so it stays next to what it measures.)"""
