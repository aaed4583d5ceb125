"""The gRPC edge: servicers that validate requests, call the domain objects and map their
errors to statuses."""
