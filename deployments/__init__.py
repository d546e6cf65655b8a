"""Ray Serve deployments (prefill, decode, router) and the app builder for serve_config.yaml."""
