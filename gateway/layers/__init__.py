"""Request-path layers. Each module holds one policy and exports a function returning a Layer."""
