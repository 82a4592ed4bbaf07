"""Ray Serve application serving the restoration network over HTTP."""
