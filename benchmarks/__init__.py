"""The benchmark suite: the fleet measured side by side with what it competes against."""
