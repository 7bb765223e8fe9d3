"""Generated protobuf/gRPC modules (make proto). Not committed."""
