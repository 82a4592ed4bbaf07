"""Training on Ray Train: the typed job config, the worker loop and the driver that fits, resumes and exports."""
