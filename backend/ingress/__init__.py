"""The ingress: the HTTP half of the backend (routes, OpenAI serving, the OpenAPI contract, keys).

It runs in Ray Serve's ingress deployment, holds no model, and reaches the model replicas through
a `DeploymentHandle` (`backend.deployments`).
"""
