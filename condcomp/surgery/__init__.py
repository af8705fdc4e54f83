"""Model surgery: new models made from the weights of trained ones (``condcomp upcycle``:
a dense model's weights as the start of a conditional one)."""
