"""End-to-end tests: the real services, as users start them."""

# The session backend's window (the embedded model's own), stated so that tests can check what
# the model card says.
CONTEXT = 8192
