"""Internal request/response types shared by every layer, and the error hierarchy."""
