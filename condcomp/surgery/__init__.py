"""Model surgery: upcycling a dense model into a conditional one, and distilling one model into another."""
